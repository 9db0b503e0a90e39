"""Looking at a converted dataset: a human summary of the manifest, and full verification."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from tfrecords_tools.features import compartment_of, feature_name
from tfrecords_tools.manifest import load_manifest, sha256_file
from tfrecords_tools.records import decode_example, iterate_records


def summarize(data_dir) -> str:
    """The manifest as a few readable lines."""
    m = load_manifest(data_dir)
    crop, counts, feats = m["crop"], m["counts"], m["features"]
    modules = Counter()
    for name in feats["names"]:
        parsed = feature_name(name)
        modules[f"{parsed.compartment} {parsed.module}" if parsed.measurement is not None
                else compartment_of(name)] += 1
    lines = [
        f"Dataset {Path(data_dir)}",
        f"  made by {m['tool']['name']} {m['tool']['version']} on {m['created']} "
        f"from {m['source']['kind']} input {m['source']['input']}",
        f"  cells: {counts['cells']} (train {counts['splits']['train']}, val "
        f"{counts['splits']['val']}, test {counts['splits']['test']}); rejected: {counts['rejected']}"
        + (f" -> {m['rejects']['file']}" if counts["rejected"] else ""),
    ]
    for reason, n in m["rejects"]["by_reason"].items():
        lines.append(f"      {n} {reason}")
    lines += [
        f"  split by {','.join(m['split']['by'])} (seed {m['split']['seed']}): groups "
        + ", ".join(f"{k} {v}" for k, v in m["split"]["groups"].items()),
        f"  crops: {crop['height']}x{crop['width']} px, channels {', '.join(m['channels'])}, "
        f"{crop['dtype']}, edge={crop['edge']}",
        "  intensity range (training split, per channel): " + "; ".join(
            f"{ch} 0-{m['intensity'][ch]['high']:g} (p{m['intensity'][ch]['percentile']:g}, "
            f"max {m['intensity'][ch]['max']:g})" for ch in m["channels"]),
        f"  features: {feats['count']} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(modules.items())) + ")",
        f"  dropped features: {len(feats['dropped'])}",
    ]
    for entry in feats["dropped"][:10]:
        lines.append(f"      {entry['name']}: {entry['reason']}")
    if len(feats["dropped"]) > 10:
        lines.append(f"      ... {len(feats['dropped']) - 10} more in manifest.json")
    names = m["treatments"]["names"]
    lines.append(f"  treatments ({','.join(m['treatments']['columns']) or 'none'}): {len(names)}")
    width = max((len(t) for t in names), default=0)
    for t in names:
        row = "  ".join(f"{s} {m['counts']['treatments'][s][t]:>6}" for s in ("train", "val", "test"))
        lines.append(f"      {t or '(none)':<{width}}  {row}")
    total_bytes = sum(s["bytes"] for s in m["shards"])
    lines.append(f"  shards: {len(m['shards'])} files, {total_bytes / 1e6:.1f} MB"
                 + (f", {m['compression']}" if m["compression"] else ""))
    return "\n".join(lines)


def quick_check(data_dir) -> list[str]:
    """The shards' problems found without reading records: missing, another size or another
    record count than the manifest's (none: [])."""
    from tfrecords_tools.shards import shard_problems

    return shard_problems(data_dir, load_manifest(data_dir), level="count")


def verify(data_dir) -> list[str]:
    """Read every record and check it against the manifest; returns the problems found (none: [])."""
    import tensorflow as tf

    m = load_manifest(data_dir)
    crop = m["crop"]
    shape = (crop["height"], crop["width"], crop["channels"])
    n_features = m["features"]["count"]
    problems = []
    seen = Counter()
    ids = set()
    for shard in m["shards"]:
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: checksum differs from manifest.json (file changed or corrupt)")
            continue
        count = 0
        try:
            for serialized in iterate_records(str(path), m.get("compression", "")):
                record = decode_example(serialized, n_features, shape, crop["dtype"])
                if record["treatment"] != shard["treatment"]:
                    problems.append(f"{path}: record {count} has treatment {record['treatment']!r}, "
                                    f"shard is {shard['treatment']!r}")
                if record["cell_id"] in ids:
                    problems.append(f"{path}: cell {record['cell_id']} appears twice in the dataset")
                ids.add(record["cell_id"])
                seen[(shard["split"], record["treatment"])] += 1
                count += 1
        except (tf.errors.DataLossError, ValueError) as err:
            problems.append(f"{path}: corrupt record after {count} good ones ({str(err).splitlines()[0]})")
            continue
        if count != shard["records"]:
            problems.append(f"{path}: {count} records, manifest says {shard['records']}")
    for split, per_treatment in m["counts"]["treatments"].items():
        for treatment, expected in per_treatment.items():
            if not problems and seen[(split, treatment)] != expected:
                problems.append(f"{split}/{treatment}: {seen[(split, treatment)]} records, "
                                f"manifest says {expected}")
    total = sum(seen.values())
    if not problems and total != m["counts"]["cells"]:
        problems.append(f"{total} records in all, manifest says {m['counts']['cells']}")
    return problems


def first_records(data_dir, n: int = 4) -> list[dict]:
    """The first n records of the training split as numpy values (for a quick look)."""
    m = load_manifest(data_dir)
    crop = m["crop"]
    shape = (crop["height"], crop["width"], crop["channels"])
    out = []
    for shard in m["shards"]:
        for serialized in iterate_records(str(Path(data_dir) / shard["file"]), m.get("compression", "")):
            out.append(decode_example(serialized, m["features"]["count"], shape, crop["dtype"]))
            if len(out) == n:
                return out
    return out

