"""Train on a lent GPU machine that cannot read the data where it lies (session 23).

The device machine of this workplace takes at most 64 MiB of files per call and has no SimpleITK, so
the training slices are prepared here exactly as `deepwml train` prepares them (`train.prepare_cache`:
the inference path's head mask, normalisation and 256 x 256 grid) and travel packed:

    python Testing/benchmarks/gpu_train.py pack --manifest M.csv --split S.csv --ignore-label 2 \
        --cache CACHE --budget-mb 54 --chunks 3 --val-mb 9 -o PACKED

writes PACKED/chunk0 (validation slices and the first training slices, meta.json) and chunk1.. (more
training slices), each under the budget. Training slices go in a seeded order alternating slices with
and without lesion, so a budget that cannot hold them all keeps every slice with lesion first and a
random share of the others. Intensities travel as uint8 (steps of 19/255 = 0.075 normalised units over
-7.5 .. 11.5) in JPEG at quality 95 (mean absolute error 0.7 of a step, under the training noise of up to
0.1 units); labels exact (lzma). On the device, after earlier calls have copied chunk1.. to a stash,

    python3 Testing/benchmarks/gpu_train.py run --data PACKED --extra STASH --jobs JOBS.json --minutes 7.5 \
        --work /tmp/gpu_runs --out OUT

unpacks them into train's cache format (float16) and runs `train.train()` for each job of JOBS.json in
its own process, all on the one GPU at once, each stopped (through train's cancel hook, an epoch in
progress is dropped) when the minutes are up; best.pt of each job is exported as fp16 to OUT with its
history.csv. `job` resumes one of them (train's own resume from last.pt). Everything else is
`deepwml train`'s own code: sampling, augmentation, loss, checkpoints. `segcheck --model A.pt` runs
`deepwml segment` of the bundled sample on cuda and on cpu and compares the masks.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

JPEG_QUALITY = 95
LO, HI = -7.5, 11.5  # normalised units held by the uint8 codes (real and synthetic slices: -6.8 .. 9.4 seen)


def quantise(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(x, np.float32) - LO) / (HI - LO) * 255), 0, 255).astype(np.uint8)


def dequantise(q: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * ((HI - LO) / 255) + LO).astype(np.float16)


def _jpeg(q: np.ndarray) -> bytes:
    import io as _io

    from PIL import Image

    b = _io.BytesIO()
    Image.fromarray(q).save(b, "JPEG", quality=JPEG_QUALITY)
    return b.getvalue()


def _unjpeg(data: bytes) -> np.ndarray:
    import io as _io

    from PIL import Image

    return np.asarray(Image.open(_io.BytesIO(data)).convert("L"), dtype=np.uint8)


def pack(args) -> int:
    """Prepare the cache, then write chunk folders of at most --budget-mb each: chunk 0 holds the
    validation slices (up to --val-mb) and the first training slices, chunks 1.. more training slices.
    Training slices go in a seeded order that alternates slices with and without lesion."""
    from DeepWMLLib import train
    from DeepWMLLib.preprocessing import PreprocessingConfig

    cases = train.read_manifest(args.manifest)
    assignment = train.read_split(args.split, cases)
    cache = Path(args.cache)
    skipped = train.prepare_cache(cases, assignment, PreprocessingConfig().to_dict(), cache, False,
                                  ignore_label=args.ignore_label)
    if skipped:
        print("skipped:", skipped)
    rng = np.random.default_rng(args.seed)
    budget = int(args.budget_mb * 2**20)
    chunks = [{"train": [], "val": [], "bytes": 0} for _ in range(args.chunks)]
    sets = {s: train.SliceSet.open(cache, s) for s in ("train", "val")}
    for split in ("val", "train"):
        s = sets[split]
        has = (np.asarray(s.labels).reshape(len(s), -1) == 1).any(axis=1)
        with_l, without = rng.permutation(np.flatnonzero(has)), rng.permutation(np.flatnonzero(~has))
        order = np.empty(len(s), dtype=np.int64)
        k = 2 * min(len(with_l), len(without))
        order[:k:2], order[1:k:2] = with_l[:k // 2], without[:k // 2]
        order[k:] = np.concatenate([with_l[k // 2:], without[k // 2:]])
        c, cap = 0, (int(args.val_mb * 2**20) if split == "val" else budget)
        for i in order:
            data = (_jpeg(quantise(s.images[i])), np.asarray(s.labels[i]).tobytes())
            size = len(data[0]) + len(data[1]) // 50  # labels compress ~50x
            if split == "val":
                if chunks[0]["bytes"] + size > cap:
                    break
            else:
                while c < len(chunks) and chunks[c]["bytes"] + size > budget:
                    c += 1
                if c == len(chunks):
                    break
            chunk = chunks[0 if split == "val" else c]
            chunk[split].append((int(i), data))
            chunk["bytes"] += size
    out = Path(args.out)
    for c, chunk in enumerate(chunks):
        folder = out / f"chunk{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            items = sorted(chunk[split])
            if not items:
                continue
            s = sets[split]
            index = np.array([i for i, _ in items], dtype=np.int64)
            jpegs = [d[0] for _, d in items]
            np.savez(folder / f"{split}_index.npz", slice_index=index, case_index=np.asarray(s.case_index)[index],
                     offsets=np.cumsum([0] + [len(j) for j in jpegs]))
            (folder / f"{split}_images.jpg.bin").write_bytes(b"".join(jpegs))
            (folder / f"{split}_labels.u8.xz").write_bytes(lzma.compress(b"".join(d[1] for _, d in items), preset=6))
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"chunk{c}: train {len(chunk['train'])}, val {len(chunk['val'])} slices, {size / 2**20:.1f} MiB", flush=True)
    meta = {"lo": LO, "hi": HI, "jpeg_quality": JPEG_QUALITY, "ignore_label": args.ignore_label,
            "manifest": str(Path(args.manifest).name), "manifest_sha256": train._sha256_file(args.manifest),
            "split_sha256": train._sha256_file(args.split),
            "cases": {s: sum(1 for v in assignment.values() if v == s) for s in train.SPLITS},
            "splits": {s: {"shape": list(v.images.shape[1:]), "cases": v.cases, "of": int(len(v)),
                           "missed_lesion_voxels": v.missed_lesion_voxels} for s, v in sets.items()}}
    (out / "chunk0" / "meta.json").write_text(json.dumps(meta, indent=1))
    return 0


def unpack(folders: list, cache: Path) -> dict:
    """Merge the chunk folders that are there (chunk0 first, with meta.json) into train's cache format."""
    meta = json.loads((Path(folders[0]) / "meta.json").read_text())
    cache.mkdir(parents=True, exist_ok=True)
    for split, m in meta["splits"].items():
        images, labels, case_index = [], [], []
        for folder in map(Path, folders):
            if not (folder / f"{split}_index.npz").is_file():
                continue
            z = np.load(folder / f"{split}_index.npz")
            blob = (folder / f"{split}_images.jpg.bin").read_bytes()
            off = z["offsets"]
            images += [dequantise(_unjpeg(blob[off[k]:off[k + 1]])) for k in range(len(off) - 1)]
            labels.append(np.frombuffer(lzma.decompress((folder / f"{split}_labels.u8.xz").read_bytes()), np.uint8)
                          .reshape(-1, *m["shape"]))
            case_index.append(z["case_index"])
        images, labels, case_index = np.stack(images), np.concatenate(labels), np.concatenate(case_index)
        m["n"] = len(images)
        np.save(cache / f"{split}_images.npy", images)
        np.save(cache / f"{split}_labels.npy", labels)
        np.savez(cache / f"{split}_index.npz", case_index=case_index.astype(np.int32),
                 lesion_pixels=(labels == 1).reshape(len(labels), -1).sum(axis=1).astype(np.int64))
        (cache / f"{split}.json").write_text(json.dumps({"cases": m["cases"], "missed_lesion_voxels": m["missed_lesion_voxels"]}))
    (cache / "meta.json").write_text(json.dumps(meta))
    return meta


def one_job(args) -> int:
    """Train one job of JOBS.json in this process (started by `run`)."""
    import logging

    from DeepWMLLib import train
    from DeepWMLLib.errors import Cancelled

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    job = json.loads(args.job)
    run_dir = Path(job.pop("run_dir"))
    meta = json.loads((Path(args.work) / "cache" / "meta.json").read_text())
    setup = {"manifest": meta["manifest"], "manifest_sha256": meta["manifest_sha256"], "split_sha256": meta["split_sha256"],
             "cases": meta["cases"], "skipped_cases": [],
             "packed_for_transfer": {"uint8_range": [meta["lo"], meta["hi"]], "jpeg_quality": meta["jpeg_quality"],
                                     "slices": {s: [m["n"], m["of"]] for s, m in meta["splits"].items()}}}

    def set_up(cfg, run_dir_, progress, cancel):  # the cache is already there (unpacked)
        run_dir_.mkdir(parents=True, exist_ok=True)
        train._lock_run_dir(run_dir_)
        (run_dir_ / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return setup

    train._set_up_run = set_up
    deadline = float(args.deadline)
    try:
        best = train.train(job, run_dir, cancel=lambda: time.time() > deadline)
        print("finished", best)
    except Cancelled:
        print("stopped at the deadline")
    return 0


def run(args) -> int:
    data, out = Path(args.data), Path(args.out)
    work = Path(args.work)
    started = time.time()
    meta = unpack([data / "chunk0"] + sorted(p for p in Path(args.extra).glob("chunk*") if p.name != "chunk0")
                  if args.extra else [data / "chunk0"], work / "cache")
    print(f"unpacked in {time.time() - started:.1f} s:", {s: m["n"] for s, m in meta["splits"].items()}, flush=True)
    jobs = json.loads(Path(args.jobs).read_text())
    deadline = started + 60 * args.minutes
    procs, returns = [], {}
    for name, job in jobs.items():
        run_dir = work / name
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "cache").exists():
            os.symlink(work / "cache", run_dir / "cache")
        returns[name] = job.pop("return", True)
        if job.get("widen_init"):
            from DeepWMLLib import train

            source = job.pop("widen_init")
            for k in range(job.pop("widen_times", 1)):  # 16 -> 32 (-> 64) channels, the same function
                source = train.widen_model(source, work / f"{name}_init{k}.pt", seed=k)
            job["init"] = str(source)
        job["run_dir"] = str(run_dir)
        job.setdefault("manifest", str(work / "cache" / "meta.json"))
        log = open(out / f"{name}.log", "w")
        procs.append((name, run_dir, subprocess.Popen([sys.executable, __file__, "job", "--work", str(work), "--job", json.dumps(job),
                                                       "--deadline", str(deadline)], stdout=log, stderr=subprocess.STDOUT)))
    for name, run_dir, p in procs:
        p.wait()
        print(name, "exit", p.returncode, flush=True)
    from DeepWMLLib import train

    for name, run_dir, _ in procs:
        if (run_dir / "history.csv").is_file():
            shutil.copy(run_dir / "history.csv", out / f"{name}_history.csv")
            print(name, "\n" + (run_dir / "history.csv").read_text(encoding="utf-8-sig"), flush=True)
        if (run_dir / "best.pt").is_file() and returns[name]:
            train.export_model(run_dir / "best.pt", out / f"{name}.pt", fp16=True)
    print(f"all done in {time.time() - started:.0f} s", flush=True)
    return 0


def segcheck(args) -> int:
    """`deepwml segment` of the bundled sample with --model on cuda and on cpu: time and agreement."""
    import gzip

    from DeepWMLLib.volume import parse_nifti

    sample = ROOT / "Resources" / "Sample" / "sample_flair.nii.gz"
    masks = {}
    for device, runs in (("cuda", 3), ("cpu", 1)):
        for r in range(runs):
            folder = Path(args.work) / f"seg_{device}_{r}"
            t = time.time()
            done = subprocess.run([sys.executable, "-c", "from DeepWMLLib.cli import run; run()", "segment", str(sample), "-o",
                                   str(folder), "--model", *args.model, "--device", device, "--overwrite"],
                                  capture_output=True, text=True)
            report = json.loads((folder / "sample_flair_report.json").read_text()) if done.returncode == 0 else {}
            print(f"segment on {device} run {r + 1}: exit {done.returncode}, {time.time() - t:.2f} s wall, "
                  f"{report.get('volume_ml')} ml, {report.get('lesion_count')} lesions", flush=True)
            if done.returncode:
                print(done.stderr[-2000:])
            else:
                masks[device] = parse_nifti(gzip.decompress((folder / "sample_flair_wmh.nii.gz").read_bytes())).array > 0
    if len(masks) == 2:
        a, b = masks["cuda"], masks["cpu"]
        print(f"cuda vs cpu mask: {int((a != b).sum())} voxels differ of {int(a.sum())} / {int(b.sum())} marked, "
              f"Dice {2 * (a & b).sum() / max(1, a.sum() + b.sum()):.5f}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--manifest", required=True)
    a.add_argument("--split", required=True)
    a.add_argument("--ignore-label", type=int)
    a.add_argument("--cache", required=True, help="where to prepare the slices (train's cache format)")
    a.add_argument("--budget-mb", type=float, default=50, help="per chunk")
    a.add_argument("--chunks", type=int, default=1)
    a.add_argument("--val-mb", type=float, default=8)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("-o", "--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True, help="folder holding chunk0 (and perhaps more chunks)")
    r.add_argument("--extra", help="another folder of chunks (sent by earlier calls)")
    r.add_argument("--jobs", required=True)
    r.add_argument("--minutes", type=float, required=True)
    r.add_argument("--work", default="/tmp/gpu_runs")
    r.add_argument("--out", required=True)
    j = sub.add_parser("job")
    j.add_argument("--work", required=True)
    j.add_argument("--job", required=True)
    j.add_argument("--deadline", required=True)
    c = sub.add_parser("segcheck")
    c.add_argument("--model", nargs="+", required=True)
    c.add_argument("--work", default="/tmp/gpu_seg")
    args = p.parse_args(argv)
    return {"pack": pack, "run": run, "job": one_job, "segcheck": segcheck}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
