"""The Table-4 summary JSON as markdown: one table per (recipe, steps, tokenizer, data set)
and the check of issue 14's required target (XL + 8K better than XL by >= 2% on every
data set and seed, >= 3% on average), then its other targets where their rows were run
(`secondary_targets`). `memorizing-table4 --report`.

When a (dataset, seed, row, eval) was run at several commits of one recipe, the newest
record in the file counts (records are appended in the order they were merged).
A recipe that changes only some rows keeps the others' runs: records carry a
hash of their row's definition (row_config) and of their recipe's XL row
(xl_config), and newer ones the recipe's whole table (recipe_rows: row or extra
evaluation -> hash). A row (and evaluation) that a recipe did not run is taken
from another recipe's record at the same steps, tokenizer, data set and seed
where it is the same run: equal row hash and, for an extra evaluation such as
memory65536, an equal evaluation hash. Records without recipe_rows lend only
their XL row, through xl_config.
Where records carry train_loss_tail (the mean training loss over the last 36% of
steps), the gains table shows XL + 8K's minus XL's: negative when the memory got
ahead in training on the same batches.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROWS = ("no_xl", "xl", "mem1536", "mem8192", "mem65536", "mem8192_empty", "finetune_mem8192",
        "finetune_control")
MIN_GAIN, MIN_MEAN_GAIN = 0.02, 0.03


def _latest(records: Sequence[Dict[str, Any]]) -> Dict[Tuple, Dict[str, Any]]:
  """(recipe, steps, tokenizer, dataset, seed, row, eval) -> the last such record."""
  out = {}
  for r in records:
    out[(r["recipe"], r["steps"], r["tokenizer"], r["dataset"], r["seed"], r["row"],
         r["eval"])] = r
  return out


def _with_same_runs(latest: Dict[Tuple, Dict[str, Any]]) -> Dict[Tuple, Dict[str, Any]]:
  """`latest` plus, for each recipe with a row table (records' recipe_rows), the
  records of other recipes that are the same run as one of its rows and that it
  has no record of (the newest such record)."""
  tables: Dict[str, Dict[str, str]] = {}
  for key, r in latest.items():
    tables.setdefault(key[0], {}).update(r.get("recipe_rows") or {})
  out = dict(latest)
  for recipe, table in tables.items():
    for key, r in latest.items():
      row, ev = key[5], key[6]
      mine = (recipe,) + key[1:]
      if key[0] == recipe or mine in latest or not table.get(row):
        continue
      same_eval = ev in ("memory", "disabled") or (
          table.get(ev) is not None and (r.get("recipe_rows") or {}).get(ev) == table[ev])
      if r.get("row_config") == table[row] and same_eval:
        out[mine] = r
  return out


def _shared_xl(latest: Dict[Tuple, Dict[str, Any]], mem: Dict[str, Any], key: Tuple
               ) -> Optional[Dict[str, Any]]:
  """The XL record for `mem` (an XL + 8K record) from another recipe whose XL row
  is the same run (equal "row_config" to mem's "xl_config"), or None."""
  want = mem.get("xl_config")
  if not want:
    return None
  steps, tok, ds, seed = key[1:5]
  found = [r for (rec, st, tk, d, sd, row, ev), r in latest.items()
           if (st, tk, d, sd, row, ev) == (steps, tok, ds, seed, "xl", "memory")
           and r.get("row_config") == want]
  return found[-1] if found else None


def gains(records: Sequence[Dict[str, Any]], recipe: Optional[str] = None
          ) -> List[Dict[str, Any]]:
  """Per (recipe, steps, tokenizer, dataset, seed) with both rows: XL's and XL + 8K's
  perplexity and the relative gain 1 - mem8192 / xl. Where the recipe has no XL
  record, an XL record of another recipe counts if its row is the same run
  (`xl_recipe` then names that recipe).

  Where the memory-always-empty row ran, the gain's two parts: `layer_gain`
  = 1 - mem8192_empty / xl (the memory layer without anything to retrieve) and
  `content_gain` = 1 - mem8192 / mem8192_empty (what it retrieves); where the
  memory-disabled evaluation ran, `off_cost` = disabled / mem8192 - 1."""
  latest = _with_same_runs(_latest(records))
  out = []
  for key, mem in latest.items():
    rec, steps, tok, ds, seed, row, ev = key
    if row != "mem8192" or ev != "memory" or (recipe and rec != recipe):
      continue
    xl = latest.get((rec, steps, tok, ds, seed, "xl", "memory")) or _shared_xl(latest, mem, key)
    if xl:
      g = {"recipe": rec, "steps": steps, "tokenizer": tok, "dataset": ds, "seed": seed,
           "xl": xl["perplexity"], "mem8192": mem["perplexity"],
           "gain": 1.0 - mem["perplexity"] / xl["perplexity"]}
      if xl["recipe"] != rec:
        g["xl_recipe"] = xl["recipe"]
      if mem.get("train_loss_tail") is not None and xl.get("train_loss_tail") is not None:
        g["train_gap"] = mem["train_loss_tail"] - xl["train_loss_tail"]
      empty = latest.get((rec, steps, tok, ds, seed, "mem8192_empty", "memory"))
      if empty:
        g["empty"] = empty["perplexity"]
        g["layer_gain"] = 1.0 - empty["perplexity"] / xl["perplexity"]
        g["content_gain"] = 1.0 - mem["perplexity"] / empty["perplexity"]
      off = latest.get((rec, steps, tok, ds, seed, "mem8192", "disabled"))
      if off:
        g["off_cost"] = off["perplexity"] / mem["perplexity"] - 1.0
      out.append(g)
  return sorted(out, key=lambda g: (g["recipe"], g["steps"], g["tokenizer"], g["dataset"],
                                    g["seed"]))


def target(gain_rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """Issue 14's required target over these (dataset, seed) pairs."""
  if not gain_rows:
    return {"holds": False, "why": "no (dataset, seed) has both XL and XL + 8K"}
  failing = [g for g in gain_rows if g["gain"] < MIN_GAIN]
  mean = statistics.mean(g["gain"] for g in gain_rows)
  holds = not failing and mean >= MIN_MEAN_GAIN
  why = (f"{len(gain_rows)} pairs, mean gain {100 * mean:.1f}%"
         + (f"; below {100 * MIN_GAIN:.0f}%: " + ", ".join(
             f"{g['dataset']} seed {g['seed']} ({100 * g['gain']:+.1f}%)" for g in failing)
            if failing else ""))
  return {"holds": holds, "mean_gain": mean, "failing": failing, "why": why}


# Issue 14's other targets: (name, row a, eval a, row b, eval b); each holds where a's
# perplexity <= b's ("no worse") or < b's ("beats") on every (data set, seed) with both.
SECONDARY = (
    ("XL + 65K no worse than XL + 8K", ("mem65536", "memory"), ("mem8192", "memory"), "no worse"),
    ("XL + 8K evaluated with 65K no worse than with 8K (and better on >= 2 data sets)",
     ("mem8192", "memory65536"), ("mem8192", "memory"), "no worse"),
    ("fine-tune with an added 8K memory beats its control",
     ("finetune_mem8192", "memory"), ("finetune_control", "memory"), "beats"),
)


def secondary_targets(records: Sequence[Dict[str, Any]], recipe: Optional[str] = None
                      ) -> Dict[Tuple, List[Dict[str, Any]]]:
  """{(recipe, steps, tokenizer): [{"name", "holds" (None: not run), "pairs": [(data
  set, seed, ppl a, ppl b)], "why"}]} for the checks of SECONDARY."""
  latest = _with_same_runs(_latest(records))
  groups = sorted({k[:3] for k in latest if not recipe or k[0] == recipe}, key=str)
  out: Dict[Tuple, List[Dict[str, Any]]] = {}
  for group in groups:
    checks = []
    for name, (row_a, ev_a), (row_b, ev_b), kind in SECONDARY:
      pairs = []
      for key, a in latest.items():
        if key[:3] == group and key[5:] == (row_a, ev_a):
          b = latest.get(group + key[3:5] + (row_b, ev_b))
          if b is not None:
            pairs.append((key[3], key[4], a["perplexity"], b["perplexity"]))
      pairs.sort(key=lambda x: (str(x[0]), x[1]))
      if not pairs:
        checks.append({"name": name, "holds": None, "pairs": [], "why": "not run"})
        continue
      bad = [x for x in pairs if (x[2] > x[3] if kind == "no worse" else x[2] >= x[3])]
      holds = not bad
      why = f"{len(pairs)} pairs" + (": " + ", ".join(
          f"{d} seed {sd} {a:.4f} vs {b:.4f}" for d, sd, a, b in bad) if bad else "")
      if row_a == row_b:      # the 65K evaluation must also be better on >= 2 data sets
        better = sorted({d for d in {x[0] for x in pairs}
                         if statistics.mean(x[2] - x[3] for x in pairs if x[0] == d) < 0},
                        key=str)
        holds = holds and len(better) >= 2
        why += f"; better (mean over seeds) on {len(better)} data set(s)" + (
            f": {', '.join(map(str, better))}" if better else "")
      checks.append({"name": name, "holds": holds, "pairs": pairs, "why": why})
    out[group] = checks
  return out


def _signal(r: Optional[Dict[str, Any]], key: str) -> str:
  mem = (r or {}).get("memory") or {}
  vals = [v[key] for v in mem.values() if isinstance(v, dict) and v.get(key) is not None]
  return f"{statistics.mean(vals):.2f}" if vals else ""


def render(records: Sequence[Dict[str, Any]], recipe: Optional[str] = None) -> str:
  """Markdown tables of the records (of `recipe` if given) and the target check."""
  latest = _with_same_runs(_latest(records))
  groups: Dict[Tuple, Dict[Tuple, Dict[str, Any]]] = {}
  for key, r in latest.items():
    if recipe and key[0] != recipe:
      continue
    groups.setdefault(key[:4], {})[key[4:]] = r
  lines = []
  for (rec, steps, tok, ds), recs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
    lines += [f"### {ds}: recipe {rec}, {steps} steps, {tok}", "",
              "| seed | row | ppl | memory disabled | evaluated with 65K | vs XL | gate | "
              "top-1 sim. | recall | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    seeds = sorted({k[0] for k in recs})
    for seed in seeds:
      xl = recs.get((seed, "xl", "memory"))
      mem = recs.get((seed, "mem8192", "memory"))
      if xl is None and mem:
        xl = _shared_xl(latest, mem, (rec, steps, tok, ds, seed))
      for row in ROWS:
        r = xl if row == "xl" else recs.get((seed, row, "memory"))
        if r is None:
          continue
        off = recs.get((seed, row, "disabled"))
        big = recs.get((seed, row, "memory65536"))
        vs = f"{100 * (r['perplexity'] / xl['perplexity'] - 1):+.1f}%" if xl and row != "xl" else ""
        ppl = lambda x: f"{x['perplexity']:.4f}" if x else ""
        if r["recipe"] != rec:
          row = f"{row} (the same run: {r['recipe']})"
        cells = (seed, row, ppl(r), ppl(off), ppl(big), vs, _signal(r, "gate_mean"),
                 _signal(r, "top1_mean"), _signal(r, "recall"), str(r.get("commit", ""))[:7])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
  rows = gains(records, recipe)
  if rows:
    pct = lambda g, k: f"{100 * g[k]:+.1f}%" if k in g else ""
    lines += ["### XL + 8K against XL", "",
              "Layer: 1 - (memory always empty) / XL; content: 1 - (XL + 8K) / (memory always "
              "empty); memory off: the XL + 8K model evaluated with its memory disabled, "
              "against with it.", "",
              "| recipe | steps | tokenizer | data set | seed | XL | XL + 8K | gain (1 - XL+8K/XL) "
              "| train loss, XL + 8K - XL (last 36% of steps) | memory always empty | layer "
              "| content | memory off |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {g['recipe']} | {g['steps']} | {g['tokenizer']} | {g['dataset']} | {g['seed']} | "
              f"{g['xl']:.4f}{' (' + g['xl_recipe'] + ')' if 'xl_recipe' in g else ''} | "
              f"{g['mem8192']:.4f} | {100 * g['gain']:+.1f}% | "
              f"{format(g['train_gap'], '+.3f') if 'train_gap' in g else ''} | "
              f"{format(g['empty'], '.4f') if 'empty' in g else ''} | {pct(g, 'layer_gain')} | "
              f"{pct(g, 'content_gain')} | {pct(g, 'off_cost')} |" for g in rows]
    lines.append("")
  for (rec, steps, tok), members in _by_recipe(rows).items():
    t = target(members)
    lines.append(f"Target (>= {100 * MIN_GAIN:.0f}% on every pair, >= {100 * MIN_MEAN_GAIN:.0f}% "
                 f"on average) for {rec}, {steps} steps, {tok}: "
                 f"**{'holds' if t['holds'] else 'does not hold'}** ({t['why']}).")
    parts = gain_parts(members)
    if parts:
      lines.append(f"  The gain's parts over the {parts['pairs']} pairs with the memory-always-empty "
                   f"row: layer {parts['layer']}, content {parts['content']} (min to max).")
  with_gains = set(_by_recipe(rows))
  for (rec, steps, tok), checks in secondary_targets(records, recipe).items():
    run = [c for c in checks if c["holds"] is not None]
    if not run and (rec, steps, tok) not in with_gains:
      continue
    lines += ["", f"Other targets for {rec}, {steps} steps, {tok}:"]
    lines += [f"- {c['name']}: **{'holds' if c['holds'] else 'does not hold'}** ({c['why']})."
              for c in run]
    lines += [f"- {c['name']}: not run." for c in checks if c["holds"] is None]
  return "\n".join(lines).rstrip() + "\n"


def gain_parts(gain_rows: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
  """The range (min to max) of the layer's and the content's gains over the pairs
  of `gain_rows` that have both, or None."""
  both = [g for g in gain_rows if "layer_gain" in g]
  if not both:
    return None
  span = lambda k: (f"{100 * min(g[k] for g in both):+.1f}% to "
                    f"{100 * max(g[k] for g in both):+.1f}%")
  return {"pairs": len(both), "layer": span("layer_gain"), "content": span("content_gain")}


def _by_recipe(rows: Sequence[Dict[str, Any]]) -> Dict[Tuple, List[Dict[str, Any]]]:
  out: Dict[Tuple, List[Dict[str, Any]]] = {}
  for g in rows:
    out.setdefault((g["recipe"], g["steps"], g["tokenizer"]), []).append(g)
  return out
