"""Document-ordered input pipeline: corpora (TFDS, ArrayRecord), tokenizers and
document streams. See docs/data.md.

Reading needs no TensorFlow: prepared data is read through TFDS's ArrayRecord
data sources.
"""
from memorizing.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, Tokenizer,
                                        get_tokenizer)
from memorizing.data.registry import (DATASETS, DatasetError, DatasetSpec, Documents,
                                      default_data_dir, load_documents, prepare,
                                      prepare_command)
from memorizing.data.pipeline import (BATCH_KEYS, Batch, DocumentStream, Prefetch,
                                      restart_at_next_documents)

__all__ = [
    "BATCH_KEYS", "Batch", "ByteTokenizer", "DATASETS", "DatasetError", "DatasetSpec",
    "DocumentStream", "Documents", "Prefetch", "SentencePieceTokenizer", "Tokenizer",
    "default_data_dir", "get_tokenizer", "load_documents", "prepare", "prepare_command",
    "restart_at_next_documents",
]
