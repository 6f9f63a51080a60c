"""How a run's objects are described, rebuilt and checkpointed.

Every component of a run (embedding, morpher, estimator, rate controller,
loss) has ``get_params()``, the arguments its constructor takes, as
scikit-learn's estimators do. :func:`describe` turns a component into plain
JSON (``{"type": name, **params}``, nested components described in turn) and
:func:`build` makes a new one from that description, accepting only the
types listed in :func:`registry`: a checkpoint names classes, it never
carries code.
"""
__all__ = ["describe", "build", "registry"]


def registry():
    """The component types a description may name."""
    from ..embedding import Embedding
    from ..encoder import Encoder
    from ..estimators import ESTIMATORS
    from ..loss import StructuralLoss
    from ..morph import Morpher
    from ..rate import RateController

    return {cls.__name__: cls for cls in (Embedding, Encoder, Morpher, *ESTIMATORS.values(),
                                          RateController, StructuralLoss)}


def describe(obj):
    """``{"type": class name, **get_params()}``, JSON-serialisable.

    Examples
    --------
    >>> from grapheme import Morpher
    >>> describe(Morpher(estimator="ste"))["estimator"]
    {'type': 'StraightThrough'}
    """
    if obj is None:
        return None
    out = {"type": type(obj).__name__}
    for key, value in obj.get_params().items():
        if hasattr(value, "get_params"):
            value = describe(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def build(spec):
    """A new component from :func:`describe` output.

    Raises
    ------
    ValueError
        If ``spec`` names an unknown type or its arguments are refused.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ValueError(f"a component description must be a dict with a 'type', got {spec!r}")
    known = registry()
    params = dict(spec)
    name = params.pop("type")
    if name not in known:
        raise ValueError(f"unknown component type {name!r}")
    for key, value in params.items():
        if isinstance(value, dict) and "type" in value:
            params[key] = build(value)
        elif isinstance(value, list):
            params[key] = tuple(value)
    try:
        return known[name](**params)
    except TypeError as exc:
        raise ValueError(f"{name} refuses its arguments: {exc}") from None


def check_sizes(config, arrays):
    """The sizes a file's configuration declares against the arrays it
    holds, before anything of those sizes is built: the embedding's and
    the encoder's ``dim`` against ``embedding.weight``'s width, the
    encoder's ``layers`` against its layers' arrays. A hand-edited
    ``dim = 10**9`` otherwise drew an unknown row of that width (8 GB)
    before the shapes were compared; with them equal, what is built is
    bounded by the file. ``ValueError`` naming the two; a malformed
    configuration is left to :func:`build` to name."""
    import numpy as np

    if not isinstance(config, dict) or "embedding.weight" not in arrays:
        return   # the missing array is named where arrays are required
    weight = arrays["embedding.weight"]
    if np.ndim(weight) != 2 or np.shape(weight)[0] < 1:
        # every table holds its unknown row: an empty one would let dim be
        # anything at no cost to the file
        raise ValueError(f"embedding.weight has shape {np.shape(weight)}, not (V >= 1, dim)")
    width = np.shape(weight)[1]
    for part in ("embedding", "encoder"):
        spec = config.get(part)
        if isinstance(spec, dict) and "dim" in spec and spec["dim"] != width:
            raise ValueError(f"embedding.weight has shape {np.shape(weight)}, the "
                             f"configuration says {part} dim={spec['dim']!r}")
    spec = config.get("encoder")
    if isinstance(spec, dict) and "layers" in spec:
        layers = {k.split(".")[1] for k in arrays
                  if k.startswith("encoder.layer") and k.count(".") == 2}
        if spec["layers"] != len(layers):
            raise ValueError(f"the configuration says encoder layers={spec['layers']!r}, "
                             f"the file holds {len(layers)} layer(s)' weights")
