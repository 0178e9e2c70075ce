"""Files shipped with the package."""

from pathlib import Path

QWEN3_TOKENIZER_DIR = Path(__file__).parent / "qwen3_tokenizer"
