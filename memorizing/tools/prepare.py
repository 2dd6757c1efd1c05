"""Prepare a named data set as ArrayRecord under --data_dir (once).

  memorizing-prepare python_stdlib --data_dir ~/tensorflow_datasets
  memorizing-prepare text_files --data_dir DIR --source 'my_corpus/**/*.txt'
  memorizing-prepare linux_c --data_dir DIR        # apt-get download; or --source PATH
  memorizing-prepare coq_stdlib --data_dir DIR     # (the .deb, or the directory it
  memorizing-prepare perl_doc --data_dir DIR       #  was extracted into with dpkg -x)
  memorizing-prepare pg19 --data_dir DIR            # network + pip install -e '.[prepare]'
  memorizing-prepare arxiv --data_dir DIR           # network
  memorizing-prepare c4_4k --data_dir DIR --c4_json 'c4/en/c4-{split}.*.json.gz' \
      --tokenizer bytes --min_tokens 4096

Training and evaluation then read the data without TensorFlow.
"""
import argparse
import glob
import os

from memorizing.data import registry, stats
from memorizing.data.tokenizers import get_tokenizer


def main(argv=None):
  p = argparse.ArgumentParser(prog="memorizing-prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", help=f"one of: {', '.join(registry.DATASETS)}")
  p.add_argument("--data_dir", default=registry.default_data_dir())
  p.add_argument("--source", help="text_files: a directory or a glob of text files; "
                 "linux_c, coq_stdlib, perl_doc: the package's .deb or a directory it was "
                 "extracted into (linux_c also: the kernel tarball or tree); default: "
                 "apt-get download")
  p.add_argument("--download_dir", help="linux_c, coq_stdlib, perl_doc: where apt-get "
                 "downloads and dpkg -x extracts the package (default DATA_DIR/downloads/debian)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a copy of NAME in --data_dir prepared from another --source")
  p.add_argument("--min_bytes", type=int, default=0, help="text_files: drop shorter files")
  p.add_argument("--validation_fraction", type=float, default=0.05, help="text_files")
  p.add_argument("--tokenizer", default="bytes",
                 help="c4_4k: tokenizer of the length filter; local corpora: tokenizer of the "
                      "reported length histogram ('bytes' or a SentencePiece .model)")
  p.add_argument("--min_tokens", type=int, default=4096, help="c4_4k: minimum document length")
  p.add_argument("--c4_json", help="c4_4k: C4 JSON-lines files, '{split}' stands for "
                                   "train/validation (default: c4/en prepared in --source_data_dir)")
  p.add_argument("--source_data_dir", help="c4_4k: data_dir holding c4/en as ArrayRecord")
  args = p.parse_args(argv)
  data_dir = os.path.expanduser(args.data_dir)

  options = {}
  if args.name == "text_files":
    options = dict(source=args.source, min_bytes=args.min_bytes,
                   validation_fraction=args.validation_fraction)
  elif args.name in ("linux_c", "coq_stdlib", "perl_doc"):
    options = dict(source=args.source, download_dir=args.download_dir)
  elif args.name == "c4_4k":
    options = dict(tokenizer=args.tokenizer, min_tokens=args.min_tokens,
                   source_data_dir=args.source_data_dir)
    if args.c4_json:
      options["json_files"] = {s: args.c4_json.format(split=s) for s in ("train", "validation")
                               if glob.glob(os.path.expanduser(args.c4_json.format(split=s)))}
      if not options["json_files"]:
        options["json_files"] = {"train": args.c4_json.format(split="train")}  # -> clear error
  if args.overwrite:
    options["overwrite"] = True
  print(registry.prepare(args.name, data_dir, **options))
  spec = registry.get_spec(args.name)
  if spec.builder is not None and args.name != "c4_4k" and args.tokenizer != "bytes":
    tokenizer = get_tokenizer(args.tokenizer)
    lengths = {}
    for split in spec.splits:
      docs = registry.load_documents(args.name, split, data_dir)
      lengths[split] = [len(tokenizer.encode(docs[i])) for i in range(len(docs))]
    print(stats.corpus_summary(args.name, lengths, os.path.basename(args.tokenizer)))
  return 0
