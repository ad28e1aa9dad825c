"""WebDataset tar shards: `mimkit data pack` writes them from a folder, `--data shards:DIR_OR_PATTERN` streams them.

Packing keeps every file's encoded bytes (`{key}.{ext}`) and its label (`{key}.cls`), in shards of at most
`--shard-size` bytes (`webdataset.ShardWriter`), plus `index.json` beside them: samples per shard, channel count,
mean / std, class names. Reading (`ShardStream`) needs that index (the pattern's folder, local or any URL
`webdataset.gopen` opens).

Order, and what resume relies on (fixed world size and data.num_workers):
- shards are assigned once: rank r takes shards r, r + world, ...; worker w of a rank takes its shards w, w + W, ...;
  so a sample belongs to exactly one (rank, worker) and no two ranks ever read the same shard;
- each epoch, a worker visits its shards in a seeded order and shuffles samples through a seeded buffer
  (`data.shuffle_buffer`); each sample's crop is seeded by (train.seed, epoch, its index in the pack);
- every worker contributes the same number of batches per epoch (the smallest worker's, the same on every rank), so
  the DataLoader's round robin over workers never skips one: batch k of an epoch comes from worker k mod W. A resumed
  run starts each worker on the role of worker (w + k) mod W and skips the batches that role already gave; so it
  continues from the shard and sample where it stopped, and reproduces the uninterrupted run exactly (on the CPU).
  A different world size or worker count re-deals the shards: the run goes on, each sample still at most once per
  epoch, but not in the uninterrupted run's order.
- Samples beyond the smallest worker's whole batches are left out of that epoch (as drop_last); shards of equal size
  (the packer's) keep that to less than a batch per worker.

Damaged packs (an interrupted copy, a disk error), and the rule for when to stop:
- Truncated or missing shards are found when the pack is opened, for local files: a shard shorter than the byte size
  `index.json` lists (packs written before sizes were listed: one that does not end in a tar's end-of-archive
  blocks) is read once to count the samples it still holds. If the samples missing from the pack are at most
  `data.max_missing` of those listed (default 1%), the run warns once, naming each shard and how many samples it
  lacks, and trains on what is there (the counts are corrected before the epoch is planned, so resume stays exact);
  beyond that share it stops with exit 2 before training.
- A shard found short while it is being streamed (a URL, which can't be measured before it is read, or a file cut
  after the run started) stops the run with one sentence naming it: the epoch's plan relies on the listed counts,
  and checkpoints already written are intact for `--resume` once the shard is whole again.
- A member that does not decode is skipped and counted like a folder's undecodable file: a warning names the shard
  and the key, and another image of the same batch takes its place (flagged, so `skipped_images` counts it).
"""
from __future__ import annotations

import itertools
import json
import os
import tarfile
import warnings
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mimkit.data.datasets import (ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, DataError, ImageFolderDataset,
                                  _match_channels, decode_jpeg_batch, resolve_spec)

INDEX = "index.json"


def pack_shards(spec: str, out: str | Path, shard_bytes: int = 1 << 30, channels: int | None = None,
                max_count: int = 10 ** 9) -> dict:
    """Folder -> `out/shard-NNNNNN.tar` + `out/index.json`; returns the index."""
    import webdataset as wds
    kind, path = resolve_spec(spec)
    if kind != "folder":
        raise DataError(f"mimkit data pack reads image folders (--data folder:DIR), not '{spec}'")
    root = path / "train" if (path / "train").is_dir() else path
    dataset = ImageFolderDataset(root, channels)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder (new or empty) for the shards")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.tar")):
        raise FileExistsError(f"{out} already holds shards; pick an empty --out folder")
    shard_of = []
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_count, maxsize=shard_bytes, verbose=0) as sink:
        for i, (file, label) in enumerate(zip(dataset.files, dataset.labels)):
            sample = {"__key__": f"{i:09d}", file.suffix.lower().lstrip("."): file.read_bytes()}
            if label >= 0:
                sample["cls"] = str(label).encode()
            sink.write(sample)
            shard_of.append(sink.shard - 1)          # ShardWriter counts the shard it has opened
    counts = [shard_of.count(s) for s in range(max(shard_of) + 1)]
    index = {"format": "mimkit-shards", "version": 1, "count": len(dataset), "channels": dataset.channels,
             "mean": dataset.mean, "std": dataset.std, "classes": dataset.classes,
             "labelled": bool(dataset.classes), "dtype": str(dataset.dtype).replace("torch.", ""),
             "shards": [{"file": f"shard-{s:06d}.tar", "count": n, "bytes": (out / f"shard-{s:06d}.tar").stat().st_size}
                        for s, n in enumerate(counts)]}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


def read_samples(url: str):
    """(key, {ext: bytes}) of every sample in one tar shard, in order (local path or URL)."""
    from webdataset.gopen import gopen
    with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        current, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if key != current and parts:
                yield current, parts
                parts = {}
            current, parts[ext] = key, tar.extractfile(member).read()
        if parts:
            yield current, parts


class ShardStream(IterableDataset):
    """A packed dataset, streamed: `len`, `channels`, `mean`, `std`, `labels` known from the index; iterate an epoch
    with `epoch(...)`."""

    def __init__(self, location: str, channels: int | None = None, shuffle_buffer: int = 1000,
                 max_missing: float = 0.01, announce=None):
        from webdataset.gopen import gopen
        # a folder, or a pattern of shard files in one folder: a name, braces ({000..009}) or a shell glob (*.tar)
        pattern = location.endswith(".tar") or "{" in location or any(c in location.rsplit("/", 1)[-1] for c in "*?[")
        base = location.rsplit("/", 1)[0] if pattern else location.rstrip("/")
        try:
            with gopen(f"{base}/{INDEX}") as f:
                self.index = json.loads(f.read())
        except (OSError, ValueError) as err:
            raise DataError(f"no readable {INDEX} in {base} ({err}); write shards with 'mimkit data pack --data "
                            f"folder:DIR --out {base}'") from None
        if not (isinstance(self.index, dict) and isinstance(self.index.get("shards"), list)
                and all(isinstance(x, dict) and {"file", "count"} <= set(x) for x in self.index["shards"])
                and {"channels", "mean", "std", "classes"} <= set(self.index)):
            raise DataError(f"{base}/{INDEX} is not a mimkit shard index (it needs 'shards': [{{'file', 'count'}}, ...], "
                            f"'channels', 'mean', 'std', 'classes'); write the shards with 'mimkit data pack'")
        names = [s["file"] for s in self.index["shards"]]
        if pattern:
            from fnmatch import fnmatchcase

            from braceexpand import braceexpand
            wanted = [u.rsplit("/", 1)[-1] for u in braceexpand(location)]
            names = [n for n in names if any(fnmatchcase(n, w) for w in wanted)]
        self.urls = [f"{base}/{n}" for n in names]
        listed = [s for s in self.index["shards"] if s["file"] in set(names)]
        self.counts = [s["count"] for s in listed]
        if not self.urls:
            raise DataError(f"'{location}' names none of the shards listed in {base}/{INDEX}")
        self._check_complete(listed, max_missing, announce or (lambda text: warnings.warn(text, stacklevel=3)))
        self.channels = channels or self.index["channels"]
        self.mean, self.std = self.index["mean"], self.index["std"]
        self.num_classes, self.skipped = len(self.index["classes"]), 0
        self.shuffle_buffer = shuffle_buffer
        self.plan = None

    def __len__(self) -> int:
        return sum(self.counts)

    def _check_complete(self, listed: list[dict], max_missing: float, announce) -> None:
        """Local shards cut short or gone: count what each still holds, correct the counts, and warn once or stop
        (the module docstring's rule)."""
        short = []
        for i, (url, entry) in enumerate(zip(self.urls, listed)):
            if "://" in url or is_whole(url, entry.get("bytes")):
                continue
            self.counts[i] = count_readable(url)
            if self.counts[i] < entry["count"]:
                short.append(f"{entry['file']} ({'missing' if not os.path.exists(url) else 'truncated'}: "
                             f"{entry['count'] - self.counts[i]} of its {entry['count']} samples missing)")
        missing, total = sum(e["count"] for e in listed) - sum(self.counts), sum(e["count"] for e in listed)
        if not missing:
            return
        what = f"{missing} of the {total} samples {INDEX} lists are missing from damaged shards: {', '.join(short)}"
        if missing > max_missing * total:
            raise DataError(f"{what}, more than data.max_missing={max_missing:g} allows; copy those shards again "
                            f"(or re-pack), or raise data.max_missing to train without them")
        announce(f"{what}; training without them (data.max_missing={max_missing:g} allows it); copy those shards "
                 f"again to use them")

    # ------------------------------------------------------------------ the deal
    def roles(self, rank: int, world: int, workers: int) -> list[list[int]]:
        """Shard indices each worker (role) of `rank` reads."""
        mine = list(range(len(self.urls)))[rank::world]
        return [mine[w::max(workers, 1)] for w in range(max(workers, 1))]

    def batches_per_worker(self, world: int, workers: int, batch: int) -> int:
        """Whole batches every worker of every rank gives per epoch (the smallest's)."""
        per = [sum(self.counts[s] for s in role) // batch for r in range(world) for role in self.roles(r, world, workers)]
        return min(per)

    def epoch(self, epoch: int, seed: int, rank: int, world: int, workers: int, batch: int, skip_batches: int,
              transform) -> "ShardStream":
        """Configure the next iteration: this epoch, this rank, resuming `skip_batches` batches in."""
        self.plan = dict(epoch=epoch, seed=seed, roles=self.roles(rank, world, workers), batch=batch,
                         per_worker=self.batches_per_worker(world, workers, batch), skip=skip_batches,
                         transform=transform)
        return self

    def __iter__(self):
        p = self.plan
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        role = (w + p["skip"]) % n
        done = (p["skip"] - role + n - 1) // n if p["skip"] > role else 0    # batches this role already gave
        take = (p["per_worker"] - done) * p["batch"]
        if take <= 0:
            return
        gen = torch.Generator().manual_seed((p["seed"] * 1_000_003 + p["epoch"]) * 7919 + 104_729 * role)
        shards = [p["roles"][role][i] for i in torch.randperm(len(p["roles"][role]), generator=gen).tolist()]
        stream = self._shuffled(self._samples(shards), gen)
        base = (p["seed"] * 1_000_003 + p["epoch"]) * 10_000_019
        mine = itertools.islice(stream, done * p["batch"], done * p["batch"] + take)   # skipped ones are not decoded
        while chunk := list(itertools.islice(mine, p["batch"])):
            images = self._decode_batch(chunk)
            for k, (key, parts, shard) in enumerate(chunk):
                j = k if images[k] is not None else stand_in(images, k)
                if j is None:
                    raise DataError(f"no image of a batch from {self.urls[shard]} decodes; re-pack the data")
                label = int(chunk[j][1].get("cls", -1))
                yield p["transform"](images[j], (base + int(key)) % (2 ** 63)), label, int(j != k)

    def _decode_batch(self, chunk) -> list[torch.Tensor | None]:
        """A batch's images: its JPEGs in one torchvision.io.decode_jpeg call (1- or 3-channel 8-bit packs), PIL for
        the rest and for a JPEG that fails there; None (with a warning naming shard and key) where a member does not
        decode."""
        fast = {}
        if self.channels in (1, 3) and self.index.get("dtype", "uint8") == "uint8":
            jpegs = [k for k, (_, parts, _) in enumerate(chunk) if "jpg" in parts or "jpeg" in parts]
            data = [torch.frombuffer(bytearray(chunk[k][1].get("jpg") or chunk[k][1]["jpeg"]), dtype=torch.uint8)
                    for k in jpegs]
            fast = {k: x for k, x in zip(jpegs, decode_jpeg_batch(data, self.channels)) if x is not None}
        return [fast[k] if k in fast else self._decode_or_skip(key, parts, shard)
                for k, (key, parts, shard) in enumerate(chunk)]

    def _decode_or_skip(self, key: str, parts: dict, shard: int) -> torch.Tensor | None:
        try:
            return self._decode(key, parts)
        except DataError:
            raise
        except Exception as err:     # as a folder's undecodable file: warn, count, use another
            ext = next((e for e in parts if e != "cls"), "?")
            warnings.warn(f"skipping {key}.{ext} in {self.urls[shard]}: it could not be decoded "
                          f"({type(err).__name__}: {err})")
            return None

    def _samples(self, shards):
        """(key, parts, shard) of each shard in turn; a shard that ends before its count stops the run (the rule)."""
        for s in shards:
            seen = 0
            try:
                for key, parts in read_samples(self.urls[s]):
                    seen += 1
                    yield key, parts, s
            except (tarfile.TarError, EOFError) as err:
                cause = f" ({err})"
            else:
                cause = ""
            if seen < self.counts[s]:
                raise DataError(f"shard {self.urls[s]} ended after {seen} of the {self.counts[s]} samples {INDEX} "
                                f"lists{cause}; it was cut short while the run read it: copy it again and pass "
                                f"--resume (checkpoints already written are intact)")

    def _shuffled(self, samples, gen: torch.Generator):
        """A seeded shuffle buffer: fill, then emit a random element for each new one."""
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(torch.randint(len(buffer), (1,), generator=gen)))
        while buffer:
            yield buffer.pop(int(torch.randint(len(buffer), (1,), generator=gen)))

    def _decode(self, key: str, parts: dict) -> torch.Tensor:
        ext = next((e for e in parts if f".{e}" in IMAGE_EXTENSIONS | ARRAY_EXTENSIONS), None)
        if ext is None:
            raise DataError(f"shard sample {key} holds no image ({', '.join(parts)}); re-pack the data")
        tmp = Path(f"{key}.{ext}")
        image = ImageFolderDataset.load_bytes(parts[ext], tmp)
        if image.shape[0] != self.channels:
            image = _match_channels(image, self.channels, tmp)
        return image

    def head(self, count: int) -> list[torch.Tensor]:
        """The first `count` images of the first shard (for the fixed picture batch)."""
        out = []
        for key, parts in read_samples(self.urls[0]):
            image = self._decode_or_skip(key, parts, 0)
            out += [] if image is None else [image]
            if len(out) == count:
                break
        return out

    def __getitem__(self, index):
        raise TypeError("shards are streamed; iterate ShardStream.epoch(...) instead of indexing")


def stand_in(images: list, k: int) -> int | None:
    """The batch's next decodable image after `k` (wrapping round), for an undecodable one; None if none decodes."""
    return next((j % len(images) for j in range(k + 1, k + len(images)) if images[j % len(images)] is not None), None)


def is_whole(path: str, size: int | None) -> bool:
    """A local shard is whole: as large as the index lists, or (no size listed) ends in a tar's end-of-archive
    blocks (two zero blocks of 512 bytes)."""
    try:
        actual = os.path.getsize(path)
        if size is not None:
            return actual >= size
        with open(path, "rb") as f:
            f.seek(max(actual - 1024, 0))
            return actual % 512 == 0 and actual >= 1024 and not any(f.read())
    except OSError:
        return False


def count_readable(url: str) -> int:
    """Samples a damaged shard still holds: whole ones up to where it is cut (0 if it is gone)."""
    seen = 0
    try:
        for _ in read_samples(url):
            seen += 1
    except (OSError, tarfile.TarError, EOFError):
        pass
    return seen


def read_back(out: str | Path) -> list[tuple[str, dict]]:
    """Every (key, parts) of a pack, shard by shard (round-trip checks)."""
    index = json.loads((Path(out) / INDEX).read_text())
    return [s for shard in index["shards"] for s in read_samples(str(Path(out) / shard["file"]))]
