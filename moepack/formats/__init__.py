"""The on-disk pack format (SPEC.md is normative): manifest schema, dtypes, alignment, encodings, reader and writer.

Nothing here knows about model architectures or MLX modules; both the converter and the runtime build on it.
"""

from moepack.formats.manifest import FORMAT_NAME, FORMAT_VERSION, Blob, Manifest, TensorRecord
from moepack.formats.reader import PackReader
from moepack.formats.writer import PackWriter

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Blob", "Manifest", "TensorRecord", "PackReader", "PackWriter"]
