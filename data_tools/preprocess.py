"""``megatron-emu-data preprocess``: inputs -> interleaved-document WebDataset shards.

Plan (parent): the format splits its inputs into units (one input file, a record range); unit
``k`` becomes ``shard-k``. Work (a pool of forked workers): read the unit, tokenize the text with
the Emu2 tokenizer, check/resize/re-encode the images, write ``shard-k.tar`` then
``shard-k.json`` (stats + index rows), each atomically. Merge (parent): ``index.npy``,
``dataset.json`` and ``summary.json``, once every unit is done. A shard whose ``.json`` exists
for the same unit, options and input size/mtime is not redone, so an interrupted run continues
where it stopped and an edited input is redone (``outdir.py``: staleness, another dataset in
``--out``, temporary files, incomplete datasets). Output bytes do not depend on the number of
workers. One bad record never stops a run: it is counted in ``summary.json['skipped']``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from data_tools import outdir, sources
from data_tools.images import DEFAULT_MAX_PIXELS, SkipSample, process_image
from data_tools.sources import RawDoc, Skip
from data_tools.video import DEFAULT_FRAMES, process_video
from megatron_emu.contracts import chat_template
from megatron_emu.data import shard_format as sf
from megatron_emu.data.tokenizer import Emu2Tokenizer

log = logging.getLogger("megatron_emu.data_tools")
LOG_PER_REASON = 20


@dataclass
class Options:
    format: str
    inputs: list[str]
    tokenizer: str
    out: str
    images: Optional[str] = None
    image_size: int = 448
    workers: int = 1
    shard_size: int = 1000
    caption_field: Optional[str] = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    # Array jobs: this task processes the units k with k % num_tasks == task_index and skips the
    # merge; a final `merge_only` run writes index/summary once every shard exists.
    num_tasks: int = 1
    task_index: int = 0
    merge_only: bool = False
    overwrite: bool = False  # replace another dataset in `out` (refused otherwise)
    video_frames: int = DEFAULT_FRAMES  # frames sampled uniformly per video (data_tools/video.py)
    system_message: str = "short"  # llava: the chat template's system message (short | detailed | none)

    def fingerprint(self, tokenizer_sha: str) -> str:
        """What the shard bytes depend on besides the unit."""
        keys = {"format": self.format, "image_size": self.image_size, "caption_field": self.caption_field,
                "max_pixels": self.max_pixels, "tokenizer": tokenizer_sha, "version": sf.FORMAT_VERSION,
                "video_frames": self.video_frames, "system_message": self.system_message}
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardStats:
    documents: int = 0
    images: int = 0
    videos: int = 0
    text_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    rows: list = field(default_factory=list)  # [key, offset, size, text_tokens, images, kind, videos]


class _Worker:
    """Per-process state: the tokenizer and the log budget per skip reason."""

    tok: Optional[Emu2Tokenizer] = None
    logged: Counter = Counter()


def _note_skip(stats: ShardStats, reason: str, key: str, detail: str = "") -> None:
    stats.skipped[reason] += 1
    _Worker.logged[reason] += 1
    if _Worker.logged[reason] <= LOG_PER_REASON:
        key, detail = (str(x).encode("utf-8", "backslashreplace").decode() for x in (key, detail))
        log.warning("skipped %s (%s)%s", key, reason, f": {detail}" if detail else "")
        if _Worker.logged[reason] == LOG_PER_REASON:
            log.warning("further %r skips are counted but not logged by this worker", reason)


def convert(raw: RawDoc, opts: Options, stats: ShardStats) -> Optional[sf.Document]:
    """Tokenize and process one document; bad images and videos are dropped (and counted);
    returns None when nothing usable is left (a pair needs its image or video and its caption; a
    conversation or generation sample needs every image and an answer or caption)."""
    segments, no_loss = [], set()
    for i, (kind, value) in enumerate(raw.segments):
        if kind == "text":  # an answer keeps its layout (code indentation): ends stripped only
            answer = raw.kind == "chat" and i not in raw.no_loss
            text = value.strip() if answer else chat_template.normalize_text(value)
            ids = _Worker.tok.encode(text) if text else []
            segment = ("text", (text, ids)) if ids else None
        elif kind == "special":
            segment = ("special", value)
        else:
            try:
                if kind == "video":
                    segment = ("video", process_video(value(), opts.video_frames, opts.image_size,
                                                      opts.max_pixels))
                else:
                    segment = ("image", process_image(value(), opts.image_size, opts.max_pixels))
            except SkipSample as e:
                _note_skip(stats, e.reason, raw.key, e.detail)
                if raw.kind != "interleaved":
                    return None
                segment = None
        if segment is not None:
            if i in raw.no_loss:
                no_loss.add(len(segments))
            segments.append(segment)
    kinds = [k for k, _ in segments]
    trained = [k for i, k in enumerate(kinds) if k == "text" and i not in no_loss]
    if not segments or (raw.kind == "pair" and kinds.count("text") != 1) or (raw.kind == "chat" and not trained):
        _note_skip(stats, "empty_document", raw.key)
        return None
    return sf.Document(key=raw.key, kind=raw.kind, segments=segments, source=raw.source,
                       no_loss=frozenset(no_loss))


def process_unit(job: tuple) -> dict:
    """Worker: one unit -> ``shard-k.tar`` + ``shard-k.json``. Returns the shard record. A
    failure (a full disk, ...) removes the temporary tar and names the file."""
    k, unit, opts, expected = job
    if _Worker.tok is None:
        _Worker.tok = Emu2Tokenizer(opts.tokenizer)
    tar_path, json_path = outdir.shard_paths(Path(opts.out), k)
    tmp_tar = outdir.temp_path(tar_path)
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            stats = _write_documents(tar, k, unit, opts)
        os.replace(tmp_tar, tar_path)
    except OSError as e:
        tmp_tar.unlink(missing_ok=True)
        if e.filename is None:  # a write error: say which file
            raise OSError(e.errno, e.strerror, str(tar_path)) from None
        raise
    except BaseException:
        tmp_tar.unlink(missing_ok=True)
        raise
    record = {"unit": expected, "tar_size": tar_path.stat().st_size, "documents": stats.documents,
              "images": stats.images, "videos": stats.videos, "text_tokens": stats.text_tokens,
              "skipped": dict(sorted(stats.skipped.items())), "rows": stats.rows}
    outdir.atomic_write(json_path, json.dumps(record, separators=(",", ":")).encode())
    return record


def _write_documents(tar: tarfile.TarFile, k: int, unit: sources.Unit, opts: Options) -> ShardStats:
    stats = ShardStats()
    for item in sources.get_format(opts.format).read(unit, opts):
        if isinstance(item, Skip):
            _note_skip(stats, item.reason, item.key, item.detail)
            continue
        try:
            doc = convert(item, opts, stats)
            if doc is None:
                continue
            doc.source = {**doc.source, "input_key": item.key}
            members = sf.encode_document(doc)
        except UnicodeError as e:  # a lone surrogate in text, a key or the source fields
            _note_skip(stats, "malformed_text", item.key, f"{type(e).__name__}: {e}")
            continue
        key = f"{k:06d}{len(stats.rows):07d}"
        start = tar.offset
        for ext, data in members.items():
            sf.write_member(tar, f"{key}.{ext}", data)
        n_text = sum(len(v[1]) if kk == "text" else 1 for kk, v in doc.segments if kk in ("text", "special"))
        stats.rows.append([key, start, tar.offset - start, n_text, doc.n_images,
                           sf.KIND_CODES[doc.kind], doc.n_videos])
        stats.documents += 1
        stats.images += doc.n_images
        stats.videos += doc.n_videos
        stats.text_tokens += n_text
    return stats


def merge(out: Path, records: list[Optional[dict]], tokenizer: Emu2Tokenizer, opts: Options) -> dict:
    """Verify that every unit is done, then write ``index.npy``, ``dataset.json`` and
    ``summary.json`` (and drop shards of units that no longer exist). With a unit not done, mark
    the dataset incomplete instead and raise."""
    missing = [sf.SHARD_PATTERN.format(k) for k, r in enumerate(records) if r is None]
    if missing:
        what = f"{len(missing)} of {len(records)} shard(s) not done, e.g. {', '.join(missing[:3])}"
        outdir.mark_incomplete(out, what)
        raise ValueError(f"{out} is incomplete ({what}); re-run the same command or array job "
                         f"(finished shards are skipped) and then the merge; training refuses it until then")
    for stale in out.glob("shard-*"):  # left by an earlier run with more units
        if stale.suffix in (".tar", ".json") and stale.stem.split("-")[1].isdigit() \
                and int(stale.stem.split("-")[1]) >= len(records):
            stale.unlink()
    rows = [[k, *r[1:7]] for k, rec in enumerate(records) for r in rec["rows"]]
    index = np.asarray(rows, dtype=np.int64).reshape(-1, sf.READABLE_VERSIONS[sf.FORMAT_VERSION])
    tmp = outdir.temp_path(out / sf.INDEX_FILE)
    try:
        np.save(tmp, index, allow_pickle=False)
        os.replace(tmp, out / sf.INDEX_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    skipped: Counter = Counter()
    for rec in records:
        skipped.update(rec["skipped"])
    shards = [sf.SHARD_PATTERN.format(k) + ".tar" for k in range(len(records))]
    meta = {**_identity(opts, tokenizer), "vocab_size": tokenizer.vocab_size, "shards": shards,
            "videos": int(index[:, sf.COL_VIDEOS].sum())}
    summary = {"documents": int(sum(r["documents"] for r in records)),
               "images": int(sum(r["images"] for r in records)),
               "videos": int(index[:, sf.COL_VIDEOS].sum()),
               "text_tokens": int(sum(r["text_tokens"] for r in records)),
               "shards": len(shards), "skipped": dict(sorted(skipped.items())),
               "pairs": int((index[:, sf.COL_KIND] == sf.KIND_CODES["pair"]).sum()),
               "interleaved": int((index[:, sf.COL_KIND] == sf.KIND_CODES["interleaved"]).sum())}
    summary.update({kind: int((index[:, sf.COL_KIND] == sf.KIND_CODES[kind]).sum())
                    for kind in ("chat", "grounded", "edit") if (index[:, sf.COL_KIND] == sf.KIND_CODES[kind]).any()})
    outdir.atomic_write(out / sf.SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    outdir.atomic_write(out / sf.DATASET_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return summary


def _identity(opts: Options, tokenizer: Emu2Tokenizer) -> dict:
    """The ``dataset.json`` fields that tell one dataset from another."""
    return {"format_version": sf.FORMAT_VERSION, "image_size": opts.image_size, "video_frames": opts.video_frames,
            "source_format": opts.format, "tokenizer_sha256": tokenizer.fingerprint()}


def run(opts: Options) -> dict:
    """Preprocess; returns the summary. Raises on unusable arguments before any work."""
    tokenizer = Emu2Tokenizer(opts.tokenizer)
    fmt = sources.get_format(opts.format)
    if opts.shard_size < 1 or opts.workers < 1 or opts.image_size < 14 or opts.video_frames < 1:
        raise ValueError("--shard-size, --workers and --video-frames must be >= 1 and --image-size >= 14")
    if not 0 <= opts.task_index < opts.num_tasks:
        raise ValueError(f"--task-index {opts.task_index} must be in [0, --num-tasks {opts.num_tasks})")
    if opts.format != "img2dataset":
        from data_tools.sources import records
        records.STORE = records.ImageStore(opts.images)
    units = fmt.plan(opts.inputs, opts)
    out = Path(opts.out)
    fingerprint = opts.fingerprint(tokenizer.fingerprint())
    stats = {os.path.abspath(u.path): outdir.input_stat(u.path) for u in units}
    expected = [outdir.unit_record(u, fingerprint, stats[os.path.abspath(u.path)]) for u in units]
    if not opts.merge_only and not opts.overwrite:
        why = outdir.foreign(out, set(stats), fingerprint, _identity(opts, tokenizer))
        if why:
            raise ValueError(f"--out {out} holds another dataset ({why}); choose another --out, "
                             f"or pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    mine = [] if opts.merge_only else [k for k in range(len(units)) if k % opts.num_tasks == opts.task_index]
    removed = outdir.clean_temp(out, mine, merge=opts.merge_only or opts.num_tasks == 1)
    if removed:
        log.info("removed %d temporary file(s) of an earlier run that did not finish, e.g. %s",
                 len(removed), removed[0])
    records: list[Optional[dict]] = [outdir.done(out, k, e) for k, e in enumerate(expected)]
    if opts.merge_only:
        return merge(out, records, tokenizer, opts)
    todo = [(k, units[k], opts, expected[k]) for k in mine if records[k] is None]
    part = f" (array task {opts.task_index} of {opts.num_tasks}: {len(mine)})" if opts.num_tasks > 1 else ""
    log.info("%s: %d input unit(s)%s, %d already done, %d to process with %d worker(s)",
             opts.format, len(units), part, len(mine) - len(todo), len(todo), opts.workers)
    if todo:  # never an old index beside new shards
        outdir.mark_incomplete(out, f"{outdir.run_label()} did not finish")
    bar = _progress(len(mine), len(mine) - len(todo), opts.progress)
    try:
        if opts.workers == 1 or len(todo) <= 1:
            _consume(map(process_unit, todo), records, units, bar)
        else:
            with mp.get_context("fork").Pool(min(opts.workers, len(todo))) as pool:
                _consume(pool.imap_unordered(process_unit, todo), records, units, bar)
    except BaseException:  # the pool's workers are gone now: so are their temporary files
        outdir.clean_temp(out, mine, merge=False)
        raise
    bar.close()
    if opts.num_tasks > 1:  # the merge step writes index/summary once all tasks are done
        done = [r for k, r in enumerate(records) if k in set(mine)]
        return {"task": opts.task_index, "num_tasks": opts.num_tasks, "shards": len(done),
                "documents": sum(r["documents"] for r in done), "images": sum(r["images"] for r in done),
                "text_tokens": sum(r["text_tokens"] for r in done),
                "skipped": dict(sum((Counter(r["skipped"]) for r in done), Counter()))}
    return merge(out, records, tokenizer, opts)


def _consume(results, records: list, units: list, bar) -> None:
    by_unit = {(os.path.abspath(u.path), u.start, u.stop): k for k, u in enumerate(units)}
    for rec in results:
        u = rec["unit"]
        records[by_unit[(u["path"], u["start"], u["stop"])]] = rec
        bar.update(1)
        bar.set_postfix(documents=sum(r["documents"] for r in records if r), refresh=False)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="shard", desc="preprocess", disable=not enabled,
                dynamic_ncols=True)
