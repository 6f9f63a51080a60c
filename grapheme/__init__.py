"""grapheme: vocabulary-free text models whose graph changes shape."""
__version__ = "0.1.0"
