"""Train a SentencePiece model that round-trips text exactly.

  memorizing-tokenizer --dataset python_stdlib --vocab_size 32000 \
      --output tokenizers/python_stdlib_32k.model
  memorizing-tokenizer --input 'my_corpus/*.txt' --vocab_size 8000 --output my.model

Use it with tokenizer='path/to/model.model' (memorizing.data.get_tokenizer).
memorizing-sweep does the same by itself for a recipe with tokenizer 'spm:N'
(memorizing/data/tokenizer_training.py holds the shared code).
"""
import argparse

from memorizing.data import registry, tokenizer_training


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
  options = dict(model_type=args.model_type, max_sentences=args.max_sentences,
                 max_bytes=args.max_bytes)
  if args.input:
    texts, heldout = tokenizer_training.file_texts(args.input)
    _, report = tokenizer_training.train_tokenizer(texts, heldout, args.output,
                                                   args.vocab_size, **options)
  else:
    _, report = tokenizer_training.train_on_dataset(args.dataset, args.data_dir, args.output,
                                                    args.vocab_size, args.split, **options)
  print(report)
  return 0

