# Result buffers: a small cache of large blocks for fresh results (included by _core.pyx)
#
# Why. A kernel result of megabytes (an (n, d) gradient, a pooled feature
# matrix) is allocated, used for one step and freed, over and over. glibc's
# malloc serves such sizes by mmap, or trims the freed top of its heap back to
# the system, so the next call faults the same memory in again and the
# kernel zeroes every page: at 1e7 x 16 doubles that costs more than the
# kernel that fills it, and at 1e4 to 1e5 nodes it made the relaxed
# forward + backward 3 to 5x slower than the same kernels writing into
# reused buffers (``python -m bench --filter "RelaxSuite|Scatter|Gather"``).
#
# What. Results of at least ``BLOCK_MIN_BYTES`` (256 KiB) come from ``take_block``: a
# ``_Block`` owns one allocation and exports it through the buffer protocol,
# the Python layer wraps it in an ndarray (``np.frombuffer``), and when the
# last array over it dies the block's memory goes back to a short list of
# idle blocks instead of to the system. The next request of about the same
# size takes it back: no page fault, no zeroing. The idle list holds at most
# ``IDLE_SLOTS`` blocks and ``limit`` bytes (``set_block_cache``); beyond that
# the oldest idle blocks are freed. Memory that arrays still use is never
# touched: a block returns to the list only from its own deallocation, which
# runs when no array, view or memoryview references it.
#
# Concurrency. Every function here runs with the GIL held (Python calls, and
# ``__dealloc__`` of a Python object), which serialises the list; no kernel
# touches it. tracemalloc sees the blocks that arrays hold (domain
# ``TRACE_DOMAIN``), as it sees numpy's own buffers.

from cpython.buffer cimport PyBuffer_FillInfo

cdef extern from "Python.h":
    int PyTraceMalloc_Track(unsigned int domain, uintptr_t ptr, size_t size)
    int PyTraceMalloc_Untrack(unsigned int domain, uintptr_t ptr)

cdef extern from *:
    """
    #include <stdlib.h>
    #if defined(_WIN32)
    #include <malloc.h>
    #elif defined(__linux__)
    #include <sys/mman.h>
    #endif

    /* Huge-page granule: large blocks are aligned and sized to it so that
       the kernel can back them with transparent huge pages (numpy asks for
       the same on its own buffers of 4 MiB and more). */
    #define GRAPHEME_HUGE (((size_t)2) << 20)

    static void *grapheme_block_alloc(size_t nbytes) {
    #if defined(_WIN32)
        return _aligned_malloc(nbytes, 64);
    #else
        void *p = NULL;
        size_t align = nbytes >= 2 * GRAPHEME_HUGE ? GRAPHEME_HUGE : 64;
        if (posix_memalign(&p, align, nbytes) != 0) return NULL;
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (nbytes >= 2 * GRAPHEME_HUGE) (void)madvise(p, nbytes, MADV_HUGEPAGE);
    #endif
        return p;
    #endif
    }

    static void grapheme_block_free(void *p) {
    #if defined(_WIN32)
        _aligned_free(p);
    #else
        free(p);
    #endif
    }
    """
    size_t HUGE_GRANULE "GRAPHEME_HUGE"
    void* block_alloc "grapheme_block_alloc"(size_t nbytes) nogil
    void block_free "grapheme_block_free"(void* p) nogil

#: Results smaller than this come from numpy. glibc keeps arrays of up to
#: 128 KiB in its heap; larger ones it maps anew or trims on free (see
#: above). Measured at 1e5 nodes: with a 1 MiB threshold the relaxation's
#: (n,) arrays of 800 kB still faulted every call (41 vs 26 ns/node).
BLOCK_MIN_BYTES = 1 << 18

cdef enum:
    IDLE_SLOTS = 16   # a training step's results of one size class fit

#: At most this many idle blocks are kept.
BLOCK_SLOTS = IDLE_SLOTS

cdef unsigned int TRACE_DOMAIN = 0x67726170   # "grap"

cdef void* _idle_ptr[IDLE_SLOTS]
cdef size_t _idle_size[IDLE_SLOTS]
cdef int _n_idle = 0
cdef size_t _idle_bytes = 0
cdef size_t _limit = 0
cdef Py_ssize_t _hits = 0, _misses = 0


cdef size_t _capacity(size_t nbytes) noexcept nogil:
    """Allocation size for a request: rounded up to 64 KiB, or to the huge
    page granule from two granules on."""
    cdef size_t g = HUGE_GRANULE if nbytes >= 2 * HUGE_GRANULE else (<size_t>1 << 16)
    return (nbytes + g - 1) // g * g


cdef void* _pop_idle(int i) noexcept:
    """Take idle block ``i`` off the list (which stays oldest first)."""
    global _n_idle, _idle_bytes
    cdef void* ptr = _idle_ptr[i]
    cdef int j
    _idle_bytes -= _idle_size[i]
    _n_idle -= 1
    for j in range(i, _n_idle):
        _idle_ptr[j] = _idle_ptr[j + 1]
        _idle_size[j] = _idle_size[j + 1]
    return ptr


cdef void _trim(size_t limit) noexcept:
    """Free the oldest idle blocks until at most ``limit`` bytes are idle."""
    while _n_idle and _idle_bytes > limit:
        block_free(_pop_idle(0))


cdef void _give_back(void* ptr, size_t size) noexcept:
    """A block nothing references any more: keep it idle, or free it."""
    global _n_idle, _idle_bytes
    if size > _limit:
        block_free(ptr)
        return
    _trim(_limit - size)
    if _n_idle == IDLE_SLOTS:
        block_free(_pop_idle(0))
    _idle_ptr[_n_idle] = ptr
    _idle_size[_n_idle] = size
    _n_idle += 1
    _idle_bytes += size


cdef class _Block:
    """One allocation of the result cache, exported as a writable buffer of
    ``nbytes`` bytes; its memory goes back to the cache when it dies."""
    cdef void* ptr
    cdef size_t size          # allocated bytes
    cdef readonly Py_ssize_t nbytes
    cdef readonly bint warm   # recycled: its pages are already mapped

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, self.nbytes, 0, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __dealloc__(self):
        if self.ptr != NULL:
            PyTraceMalloc_Untrack(TRACE_DOMAIN, <uintptr_t>self.ptr)
            _give_back(self.ptr, self.size)
            self.ptr = NULL


def take_block(Py_ssize_t nbytes):
    """A :class:`_Block` of ``nbytes`` (> 0) writable, 64-byte aligned bytes.

    Reuses the smallest idle block that holds ``nbytes`` without wasting more
    than half of it (``warm`` is then True); allocates otherwise. O(1): the
    idle list has at most ``IDLE_SLOTS`` entries. Raises ``MemoryError``.
    """
    global _hits, _misses
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    cdef size_t want = <size_t>nbytes
    cdef int i, best = -1
    for i in range(_n_idle):
        if want <= _idle_size[i] <= 2 * want and (best < 0 or _idle_size[i] < _idle_size[best]):
            best = i
    cdef _Block block = _Block.__new__(_Block)
    if best >= 0:
        block.size, block.warm = _idle_size[best], True
        block.ptr = _pop_idle(best)
        _hits += 1
    else:
        block.size = _capacity(want)
        block.ptr = block_alloc(block.size)
        if block.ptr == NULL:
            # idle memory may be what is missing: free it and try once more
            _trim(0)
            block.ptr = block_alloc(block.size)
            if block.ptr == NULL:
                raise MemoryError(f"cannot allocate {nbytes} bytes for a result")
        block.warm = False
        _misses += 1
    block.nbytes = nbytes
    PyTraceMalloc_Track(TRACE_DOMAIN, <uintptr_t>block.ptr, block.size)
    return block


def set_block_cache(Py_ssize_t limit):
    """Keep at most ``limit`` bytes of idle blocks (0: keep none); frees the
    oldest idle blocks beyond it at once. Returns the previous limit."""
    global _limit
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    previous = _limit
    _limit = <size_t>limit
    _trim(_limit)
    return previous


def block_cache_info():
    """``(limit, idle_bytes, idle_blocks, hits, misses)`` of the result cache."""
    return _limit, _idle_bytes, _n_idle, _hits, _misses
