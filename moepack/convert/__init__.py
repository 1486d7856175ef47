"""The converter: Hugging Face checkpoint -> pack. Entry point: :func:`moepack.convert.pipeline.convert`."""
