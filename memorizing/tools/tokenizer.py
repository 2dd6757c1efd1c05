"""Train a SentencePiece model that round-trips text exactly.

  memorizing-tokenizer --dataset python_stdlib --vocab_size 32000 \
      --output tokenizers/python_stdlib_32k.model
  memorizing-tokenizer --input 'my_corpus/*.txt' --vocab_size 8000 --output my.model

Use it with tokenizer='path/to/model.model' (memorizing.data.get_tokenizer).
"""
import argparse
import glob
import os

from memorizing.data import registry
from memorizing.data.tokenizers import train_sentencepiece
from memorizing.errors import MissingFileError


def main(argv=None):
  p = argparse.ArgumentParser(prog="memorizing-tokenizer", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--output", required=True, help="path of the .model file to write")
  p.add_argument("--dataset", default="python_stdlib", help=f"one of {', '.join(registry.DATASETS)}")
  p.add_argument("--split", default="train")
  p.add_argument("--data_dir", default=registry.default_data_dir())
  p.add_argument("--input", help="glob of text files to train on instead of --dataset")
  p.add_argument("--vocab_size", type=int, default=32000)
  p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
  p.add_argument("--max_bytes", type=int, default=200_000_000, help="text read for training")
  p.add_argument("--max_sentences", type=int, default=2_000_000, help="lines sampled by SentencePiece")
  args = p.parse_args(argv)

  if args.input:
    files = sorted(glob.glob(os.path.expanduser(args.input), recursive=True))
    if not files:
      raise MissingFileError(f"no files match {args.input!r}")
    texts = (open(f, "rb").read() for f in files)
    heldout = [open(files[-1], "rb").read()]
  else:
    docs = registry.load_documents(args.dataset, args.split, args.data_dir)
    texts = (docs[i] for i in range(len(docs)))
    heldout = list(registry.load_documents(args.dataset, "validation", args.data_dir)[:4])
  tokenizer = train_sentencepiece(texts, args.output, args.vocab_size, model_type=args.model_type,
                                  max_sentences=args.max_sentences, max_bytes=args.max_bytes)
  exact = all(tokenizer.decode(tokenizer.encode(t)) == t.decode("utf-8", "replace") for t in heldout)
  print(f"wrote {args.output}: vocab {tokenizer.vocab_size}, "
        f"{tokenizer.bytes_per_token(heldout):.3f} bytes/token on held-out text, "
        f"exact round trip: {exact}")
  return 0

