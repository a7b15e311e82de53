"""The ``unipt`` command.

    unipt run RECIPE [KEY=VALUE ...]        extract (resuming) + train every run + print the table
    unipt extract RECIPE [KEY=VALUE ...]    stage 1 only: frozen backbone -> feature store
    unipt train RECIPE [KEY=VALUE ...]      stage 2 only: side networks from the store (no backbone)
    unipt eval CHECKPOINT --store URL       score a checkpoint on a split of a store (two towers: --pairs)
    unipt predict CHECKPOINT --input FILE   backbone + side network on raw texts: labels and probabilities
    unipt index CHECKPOINT --store URL --output INDEX    embed a two-tower checkpoint's gallery from its store
    unipt search INDEX --query TEXT | --image PATH       the gallery's nearest ids for raw queries
    unipt store info|ls|skipped|verify|rm-part|index|export ...   inspect, maintain and export feature stores
    unipt recipes [NAME]                    list shipped recipes, or print one (to copy and edit)

RECIPE is a shipped recipe's name or a path to a TOML file.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from typing import Sequence

from ._recipe import find_recipe, load_recipe, recipe_has_towers, shipped_recipes

log = logging.getLogger("unipt")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # KEY=VALUE overrides may come before or after options (`unipt run r -q a=1 b=2`): argparse stops
    # filling a positional list at the first option, so collect the stragglers here.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_third_party()
    try:
        return args.handler(args)
    except (ValueError, KeyError, OSError, RuntimeError, OverflowError) as exc:
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else _os_error(exc) if isinstance(
            exc, OSError) else exc
        print(f"unipt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed parts and finished checkpoints are kept; re-run to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unipt", description="UniPT at scale: extract once, train many side networks.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--version", action="version", version=f"unipt {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_command(name: str, help: str, handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.add_argument("recipe", help="a shipped recipe's name (see `unipt recipes`) or a path to a TOML recipe")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="override any recipe field by dotted path, e.g. train.unipt.lr=1e-3 extract.batch_size=64")
        p.add_argument("--full", action="store_true", help="use every source example (drop source.max_examples caps)")
        what = {"extract": "extract", "train": "train the sweep's pass groups", "run": "extract and train"}[name]
        p.add_argument("--workers", type=int, metavar="N", help=f"{what} on a local dask cluster of N processes")
        p.add_argument("--scheduler", metavar="ADDRESS", help=f"{what} on an existing dask cluster (tcp://host:8786; "
                                                              "dask-cuda's LocalCUDACluster: one worker per GPU)")
        p.set_defaults(handler=handler)
        return p

    run = recipe_command("run", "extract (resuming a partial store) and train every run of a recipe", _cmd_run)
    extract = recipe_command("extract", "run the frozen backbone once and write the feature store", _cmd_extract)
    extract.add_argument("--summary-json", metavar="PATH",
                         help="also write this run's summary as JSON (parts it wrote, examples, timings; a "
                              "retrieval recipe: one summary per tower)")
    train = recipe_command("train", "train the recipe's side networks from its feature store", _cmd_train)
    train.add_argument("--run", action="append", default=[], metavar="NAME",
                       help="train only this run, or every run of this sweep section (repeatable)")
    train.add_argument("--separate", action="store_true",
                       help="one pass over the store per run, instead of one per group of compatible runs (timing)")
    for command in (train, run):
        command.add_argument("--restart", action="store_true",
                             help="train every run from scratch (default: finished runs are read back and unfinished "
                                  "ones resume from their last saved epoch)")
        command.add_argument("--stack", choices=("auto", "on", "off"),
                             help="stack runs whose parameter shapes agree into one batched step: on, off, or auto = "
                                  "where it measures faster (default: each run's `stack`, auto)")
    train.add_argument("--allow-incomplete", action="store_true",
                       help="train on the committed parts of a store whose extraction has not finished (default: "
                            "refuse, naming what is missing)")

    ev = sub.add_parser("eval", parents=[common], help="score a checkpoint on a split of a feature store")
    ev.add_argument("checkpoint", help="a checkpoint folder (model.safetensors + config.json)")
    ev.add_argument("--store", help="feature store path or URL (a two-tower checkpoint: see --pairs)")
    ev.add_argument("--pairs", metavar="PAIRS_JSON", help="a two-tower checkpoint: the pair index its recipe built "
                                                          "(<workdir>/pairs.json); its two stores are read from it")
    ev.add_argument("--query-store", metavar="URL", help="a two-tower checkpoint: the query store, if it moved")
    ev.add_argument("--document-store", metavar="URL", help="a two-tower checkpoint: the document store, if it moved")
    ev.add_argument("--split", default="test", help="split to score (default: test)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--allow-incomplete", action="store_true",
                    help="score the committed parts of a split whose extraction has not finished")
    ev.set_defaults(handler=_cmd_eval)

    pr = sub.add_parser("predict", parents=[common], help="predict from raw texts (labels, label sets, values, tags): "
                                                          "backbone + side network")
    pr.add_argument("checkpoint", help="a checkpoint folder (model.safetensors + config.json)")
    pr.add_argument("--input", required=True, metavar="FILE",
                    help="CSV, TSV, JSONL or Parquet with a text column, or .txt with one example per line")
    pr.add_argument("--output", metavar="FILE", help=".csv, .tsv or .jsonl: id and the task's prediction (a "
                                                     "classifier: label, prob_<label>...; default: CSV on stdout)")
    pr.add_argument("--text-column", default="text", help="input column holding the text (default: text); for a "
                                                          "tagger, the words (a list, or a string split on spaces)")
    pr.add_argument("--text-pair-column", help="input column holding the second text of each pair, for a side "
                                               "network trained on pairs (default: the column its store used)")
    pr.add_argument("--id-column", help="input column copied to the output as id (default: id, when present)")
    pr.add_argument("--backbone", metavar="PATH", help="the backbone's model folder or pkg:// path (default: "
                                                       "where the checkpoint's store found it); hashes are checked")
    pr.add_argument("--store", metavar="URL", help="read backbone location, max_length and dtype from this store "
                                                   "(default: the checkpoint's record, else the store it names)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    pr.set_defaults(handler=_cmd_predict)

    st = sub.add_parser("store", help="inspect, maintain and export feature stores (info, ls, skipped, verify, rm-part, index, export)")
    st_sub = st.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")
    info = st_sub.add_parser("info", parents=[common], help="splits, parts, examples, tokens, bytes, provenance")
    info.add_argument("url", help="feature store path or URL")
    info.add_argument("--json", action="store_true", help="print everything as JSON")
    info.set_defaults(handler=_cmd_store_info)
    ls = st_sub.add_parser("ls", parents=[common], help="list the feature stores directly under a folder or prefix")
    ls.add_argument("prefix", help="folder or URL prefix holding stores")
    ls.set_defaults(handler=_cmd_store_ls)
    sk = st_sub.add_parser("skipped", parents=[common], help="list the bad source rows extraction left out (TSV)")
    sk.add_argument("url", help="feature store path or URL")
    sk.set_defaults(handler=_cmd_store_skipped)
    ver = st_sub.add_parser("verify", parents=[common], help="re-hash every object against its commit record")
    ver.add_argument("url", help="feature store path or URL")
    ver.set_defaults(handler=_cmd_store_verify)
    rm = st_sub.add_parser("rm-part", parents=[common], help="delete a (damaged) part so extraction redoes it")
    rm.add_argument("url", help="feature store path or URL")
    rm.add_argument("split")
    rm.add_argument("part", help="part name, e.g. part-000003")
    rm.set_defaults(handler=_cmd_store_rm_part)
    ix = st_sub.add_parser("index", parents=[common],
                           help="rebuild the split indexes (what opening a split reads) from the part folders")
    ix.add_argument("url", help="feature store path or URL")
    ix.add_argument("--split", action="append", default=None, help="only this split (repeatable; default: all)")
    ix.set_defaults(handler=_cmd_store_index)

    ex = st_sub.add_parser("export", parents=[common], help="write committed parts as webdataset tar shards")
    ex.add_argument("url", help="feature store path or URL")
    ex.add_argument("out", help="output folder (new or empty): <split>-NNNNNN.tar shards + manifest.json")
    ex.add_argument("--format", default="webdataset", choices=["webdataset"], help="output format")
    ex.add_argument("--split", action="append", default=None, help="export only this split (repeatable)")
    ex.add_argument("--layers", default=None, help="comma-separated layer indices (default: all stored)")
    ex.add_argument("--maxcount", type=int, default=10_000, help="examples per tar shard")
    ex.set_defaults(handler=_cmd_store_export)

    from ._search import add_commands as add_search_commands

    add_search_commands(sub, common)  # unipt index, unipt search: two-tower retrieval checkpoints

    rc = sub.add_parser("recipes", parents=[common], help="list shipped recipes, or print one")
    rc.add_argument("name", nargs="?", help="print this recipe (redirect to a file to start your own)")
    rc.set_defaults(handler=_cmd_recipes)
    return parser


def _recipe(args):
    # --full, --workers and --scheduler set the extraction of the recipe's one store, or of both its towers.
    prefixes = [f"towers.{t}." for t in ("query", "document")] if recipe_has_towers(args.recipe) else [""]
    overrides = list(args.overrides)
    for prefix in prefixes:
        if args.full:
            overrides.append(f"{prefix}source.max_examples={{}}")
        if args.command == "train":
            continue  # there --workers and --scheduler are the training cluster's
        if args.workers is not None:
            overrides.append(f"{prefix}extract.workers={args.workers}")
        if args.scheduler:
            overrides.append(f"{prefix}extract.scheduler='{args.scheduler}'")
    return load_recipe(args.recipe, overrides)


def _stages(recipe):
    """(extract, train) stage functions for this kind of recipe: one store, or two towers (retrieval)."""
    from ._recipe import RetrievalRecipe

    if isinstance(recipe, RetrievalRecipe):
        from ._retrieval import extract_towers, train_retrieval_stage

        return extract_towers, train_retrieval_stage
    from ._stages import extract_stage, train_stage

    return extract_stage, train_stage


def _training_options(args) -> dict:
    """The train stage's options from the command line (a cluster for `unipt run` is set in the recipe's
    [extract] section too: both stages use it)."""
    return {"restart": args.restart, "stack": args.stack, "workers": args.workers, "scheduler": args.scheduler}


def _cmd_extract(args) -> int:
    recipe = _recipe(args)
    extract, _ = _stages(recipe)
    summary = extract(recipe, progress=not args.quiet)
    if args.summary_json:
        from unipt.extract._runner import summary_dict

        summaries = {tower: summary_dict(s) for tower, s in summary.items()} if isinstance(summary, dict) else \
            summary_dict(summary)
        with open(args.summary_json, "w") as f:
            json.dump(summaries, f, indent=1)
    return 0


def _cmd_train(args) -> int:
    from ._stages import results_table, write_report

    recipe = _recipe(args)
    _, train = _stages(recipe)
    results = train(recipe, args.run, separate=args.separate, progress=not args.quiet,
                    allow_incomplete=args.allow_incomplete, **_training_options(args))
    print(results_table(results))
    write_report(recipe, results, None)
    return 0


def _cmd_run(args) -> int:
    from ._stages import results_table, write_report

    recipe = _recipe(args)
    extract, train = _stages(recipe)
    extraction = extract(recipe, progress=not args.quiet)
    results = train(recipe, progress=not args.quiet, **_training_options(args))
    print()
    print(f"{recipe.name}: {recipe.description}".rstrip(": "))
    print(results_table(results))
    summaries = extraction if isinstance(extraction, dict) else {"": extraction}
    for tower, summary in summaries.items():
        print(f"\nextraction{f' of the {tower} tower' if tower else ''} (once, shared by every run): "
              f"{summary.describe()}")
    report = write_report(recipe, results, extraction)
    print(f"report: {report}   checkpoints: {recipe.checkpoints}   metrics: {recipe.metrics_log}")
    return 0


def _cmd_eval(args) -> int:
    from unipt.store import FeatureStore, PairIndex
    from unipt.train import evaluate_checkpoint
    from unipt.train._checkpoint import read_checkpoint_config

    if read_checkpoint_config(args.checkpoint).get("kind") == "two-tower":
        from unipt.train.retrieval import evaluate_two_tower

        if not args.pairs:
            raise ValueError(f"{args.checkpoint} is a two-tower checkpoint: pass the pair index its recipe built "
                             "(--pairs <workdir>/pairs.json)")
        index = PairIndex.load(args.pairs)
        stores = [FeatureStore.open(given or index.stores[tower]["url"])
                  for tower, given in (("query", args.query_store), ("document", args.document_store))]
        metrics = evaluate_two_tower(args.checkpoint, *stores, index, args.split, batch_size=args.batch_size,
                                     device=args.device)
        print(json.dumps({"checkpoint": args.checkpoint, "split": args.split, **metrics}, indent=2))
        return 0
    if not args.store:
        raise ValueError("pass the store to score the checkpoint on (--store URL)")
    metrics = evaluate_checkpoint(args.checkpoint, FeatureStore.open(args.store), args.split,
                                  batch_size=args.batch_size, device=args.device,
                                  allow_incomplete=args.allow_incomplete)
    print(json.dumps({"checkpoint": args.checkpoint, "split": args.split, **metrics}, indent=2))
    return 0


def _cmd_predict(args) -> int:
    from ._inference import SideNetworkPredictor, checkpoint_inputs, output_format, read_inputs, write_predictions

    output_format(args.output)  # a bad --output suffix, or a bad input row, fails before the backbone is loaded
    words, pair_column = checkpoint_inputs(args.checkpoint)
    ids, inputs = read_inputs(args.input, args.text_column, args.id_column,
                              text_pair_column=args.text_pair_column or pair_column, words=words)
    predictor = SideNetworkPredictor.from_checkpoint(args.checkpoint, args.backbone, device=args.device,
                                                     store=args.store)
    predictions = predictor.predict(inputs, batch_size=args.batch_size, progress=not args.quiet)
    write_predictions(args.output, predictions, ids)
    if args.output:
        log.info("wrote %d predictions to %s", len(inputs.texts), args.output)
    return 0


def _cmd_store_info(args) -> int:
    from unipt.store import FeatureStore, describe

    info = describe(FeatureStore.open(args.url))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    backbone = info["provenance"].get("backbone", {})
    print(f"{info['url']}  (unipt store v{info['format_version']}, {info['dtype']}, {info['compression']})")
    print(f"backbone   {backbone.get('architecture', '?')} {backbone.get('location', '')}  "
          f"weights sha256 {str(backbone.get('weights_sha256', '?'))[:16]}…")
    if info["layout"] == "maps":  # one fixed-shape map per example
        shapes = ", ".join("x".join(map(str, shape)) for shape in info["layer_shapes"])
        print(f"layers     {info['layers']}  maps (H x W x C) {shapes}")
    else:
        print(f"layers     {info['layers']}  widths {sorted(set(info['layer_widths']))}")
    kind = info.get("task", "classification")
    noun = {"regression": "target", "tagging": "tag", "multilabel": "label"}.get(kind, "class")
    count = len(info["label_names"])
    print(f"task       {kind}: {count} {noun}{'' if count == 1 else 'es' if noun == 'class' else 's'} "
          f"{info['label_names']}")
    print("checksums  " + (f"{info['chunk_checksum']} on every chunk, checked by every read" if info["chunk_checksum"]
                            else "none on chunks (written by an older unipt: reads cannot detect changed bytes; "
                                 "`unipt store verify` re-hashes every object)")
          + ("; root metadata sha256 checked on open" if info["metadata_checksum"] else ""))
    version = info.get("source_version")
    if version is not None:  # a streamed source's store: which version of the source it holds
        print(f"source     version {version['version']} ({version['created']}): {version['rows']:,} rows in "
              f"{version['pieces']} pieces of {version['shards']} shard(s), fingerprint {version['fingerprint'][:16]}…")
    print(f"{'split':12s} {'parts':>9s} {'examples':>9s} {'tokens':>10s} {'truncated':>9s} {'MiB':>9s}")
    for split, row in info["splits"].items():
        planned = "" if row["planned_parts"] is None else f"/{row['planned_parts']}"
        print(f"{split:12s} {str(row['parts']) + planned:>9s} {row['examples']:9d} {row['tokens']:10d} "
              f"{row['truncated']:9d} {row['bytes'] / 2**20:9.1f}")
    per_value = info["bytes_per_value"]
    print(f"total {info['bytes'] / 2**20:.1f} MiB; {per_value:.3f} bytes per stored value" if per_value else "empty")
    for split, row in info["splits"].items():  # stochastic views (extract.views): view 0 is the eval-mode cache
        if row.get("views", 1) > 1:
            sizes = ", ".join(f"{nbytes / 2**20:.1f}" for nbytes in row["bytes_per_view"])
            print(f"views      {split}: {row['views']} per example (view 0 = eval mode); MiB per view {sizes}")
    incomplete = [f"{split} {row['parts']} of {row['planned_parts']}" for split, row in info["splits"].items()
                  if row["planned_parts"] is not None and row["parts"] < row["planned_parts"]]
    if incomplete:
        print(f"incomplete {', '.join(incomplete)} planned parts committed; re-run extraction to finish it")
    for split, row in info["splits"].items():
        for part, state in row["not_committed"].items():
            if state != "uncommitted":  # uncommitted ones are listed with their claims below, or are leftovers
                print(f"{state:10s} {split}/{part}: `unipt store verify` says why")
    if info["skipped"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(info["skipped"].items()))
        print(f"skipped    {sum(info['skipped'].values())} bad source rows ({reasons}); "
              "`unipt store skipped` lists them")
    for claim in info["in_progress"]:
        age = time.time() - float(claim["heartbeat"] or 0)
        stale = claim["stale"]  # why another run may take the claim over, or None while its holder is alive
        why = f"; stale, {stale}: the next extraction takes it over" if stale else ""
        print(f"{'stale' if stale else 'writing':10s} {claim['split']}/{claim['part']} claimed by pid {claim['pid']} "
              f"on {claim['host']} (run {str(claim['run'])[:8]}, heartbeat {age:.0f}s ago{why})")
    return 0


def _cmd_store_skipped(args) -> int:
    from unipt.store import FeatureStore

    out = csv.writer(sys.stdout, delimiter="\t", lineterminator="\n")
    out.writerow(["source_row", "example_id", "reason"])
    for record in FeatureStore.open(args.url).skipped():
        out.writerow([record["source_row"], record["example_id"], record["reason"]])
    return 0


def _cmd_store_ls(args) -> int:
    import fsspec

    from unipt.store import FeatureStore, StoreError

    fs, root = fsspec.core.url_to_fs(args.prefix)
    protocol = args.prefix.split("://", 1)[0] + "://" if "://" in args.prefix else ""
    found = 0
    for entry in sorted(fs.ls(root, detail=False)):
        url = protocol + entry if protocol else entry
        try:
            store = FeatureStore.open(url)
        except (StoreError, FileNotFoundError, NotADirectoryError, ValueError):
            continue
        found += 1
        counts = ", ".join(f"{s} {store.num_examples(s)}" for s in store.splits())
        arch = store.provenance.get("backbone", {}).get("architecture", "?")
        print(f"{url}\t{arch}\t{store.dtype}\tlayers {len(store.layers)}\t{counts}")
    if not found:
        print(f"no unipt stores under {args.prefix}", file=sys.stderr)
    return 0


def _cmd_store_verify(args) -> int:
    from unipt.store import FeatureStore, verify

    report = verify(FeatureStore.open(args.url))
    for problem in report.problems:
        print(problem)
    for note in report.notes:
        print(f"note       {note}")
    print(f"{report.url}: {report.parts} parts, {report.objects} objects, {report.bytes / 2**20:.1f} MiB checked; "
          f"{'OK' if report.ok else f'{len(report.problems)} problem(s); `unipt store rm-part` a damaged part, then re-run extraction'}")
    return 0 if report.ok else 1


def _cmd_store_rm_part(args) -> int:
    from unipt.store import FeatureStore, remove_part

    removed = remove_part(FeatureStore.open(args.url, mode="r+"), args.split, args.part)
    print(f"removed {args.split}/{args.part} ({removed} objects); the next extraction run redoes it")
    return 0


def _cmd_store_index(args) -> int:
    from unipt.store import FeatureStore, rebuild_index

    store = FeatureStore.open(args.url, mode="r+")
    plan = store.plan or {}
    for split in args.split or store.splits():
        result = rebuild_index(store, split)
        planned = plan.get(split, {}).get("parts")
        of = "" if planned is None else f" of {planned} planned"
        print(f"{split}: indexed {result.parts}{of} parts ({result.examples:,} examples) as generation "
              f"{result.generation}")
        for part, state, detail in result.not_committed:
            print(f"  {state:10s} {split}/{part}{': ' + detail if detail else ''} (not indexed)")
    return 0


def _cmd_store_export(args) -> int:
    from unipt.store import FeatureStore, export_webdataset

    layers = None if args.layers is None else [int(v) for v in args.layers.split(",")]
    shards = export_webdataset(FeatureStore.open(args.url), args.out, splits=args.split, layers=layers,
                               maxcount=args.maxcount)
    print(f"wrote {len(shards)} webdataset shard(s) and manifest.json to {args.out}")
    return 0


def _cmd_recipes(args) -> int:
    if args.name:
        print(find_recipe(args.name).read_text(), end="")
        return 0
    for name, path in sorted(shipped_recipes().items()):
        recipe = load_recipe(str(path))
        print(f"{name:24s} {recipe.description}")
    return 0


def _os_error(exc: OSError) -> str:
    """One line for a file system error: what failed, on which path, and what to check."""
    if exc.filename is None:  # raised with a message of its own (unipt's, or a library's)
        return str(exc)
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    hint = {PermissionError: "check that this user may write there (a store shared read-only can still be read: "
                             "`unipt train` and `unipt eval` write only to the recipe's workdir)",
            FileExistsError: "choose a path that does not exist yet",
            IsADirectoryError: "it is a folder where a file was expected",
            NotADirectoryError: "a part of the path is a file where a folder was expected"}.get(type(exc))
    return f"{exc.strerror or exc}: {where}" + (f"; {hint}" if hint else "")


def _quiet_third_party() -> None:
    # transformers draws its own progress bar for every weight load; ours already says what is happening.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unipt")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
