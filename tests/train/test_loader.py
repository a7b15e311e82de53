"""ActivationLoader over a real on-disk feature store written part by part (no backbone involved)."""

from __future__ import annotations

import gc
import threading
import time
import types
import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import write_tiny_store
from unipt.store import FeatureStore, StoreError
from unipt.train import ActivationLoader, LoaderConfig

LAYERS = (0, 2)
WIDTHS = {0: 6, 2: 10}  # two layers of different widths
# examples per part, with ragged lengths (several of length 1)
PART_LENGTHS = [
    [3, 1, 7, 2, 5],
    [1, 1, 4],
    [6, 2, 8, 1, 3, 2, 5],
    [4],
    [2, 9, 1, 3],
]
N_EXAMPLES = sum(len(p) for p in PART_LENGTHS)


def write_store(url: str, dtype: str = "float32", seed: int = 0):
    """Write PART_LENGTHS into a new store; return it and {example_id: (label, length, {layer: rows})}."""
    store = FeatureStore.create(
        url, layers=LAYERS, layer_widths=[WIDTHS[l] for l in LAYERS], dtype=dtype,
        label_names=["a", "b", "c"], provenance={"backbone": "none", "test": True},
    )
    g = torch.Generator().manual_seed(seed)
    expected = {}
    start = 0
    for index, lengths in enumerate(PART_LENGTHS):
        n_tokens = sum(lengths)
        writer = store.part_writer("train", index, n_examples=len(lengths), n_tokens=n_tokens, source_start=start)
        ids, labels = [], []
        for j, n in enumerate(lengths):
            k = start + j
            eid, label = f"ex{k:03d}", k % 3
            # non-zero values everywhere (offset by 1) so zero padding is distinguishable from data
            rows = {l: torch.randn(n, WIDTHS[l], generator=g) + (k + 1) for l in LAYERS}
            writer.append(rows)  # one example per append: several appends per part
            expected[eid] = (label, n, rows)
            ids.append(eid)
            labels.append(label)
        writer.finish(ids, labels, lengths)
        start += len(lengths)
    return store, expected


@pytest.fixture(scope="module")
def store_and_expected(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("loader") / "store.zarr")
    store, expected = write_store(url)
    return FeatureStore.open(url), expected


MODES = {
    "memory": lambda: LoaderConfig(mode="memory", bucket_batches=2, prefetch_batches=2, background="on"),
    "stream": lambda: LoaderConfig(mode="stream", shuffle_buffer=3, bucket_batches=1, prefetch_parts=1,
                                   decode_threads=2, prefetch_batches=2, background="on"),
    # The same plans, padded on the consumer's thread (the default where torch already uses every core).
    "memory-inline": lambda: LoaderConfig(mode="memory", bucket_batches=2, background="off"),
    "stream-inline": lambda: LoaderConfig(mode="stream", shuffle_buffer=3, bucket_batches=1, prefetch_parts=1,
                                          decode_threads=2, background="off"),
}


def make_loader(store, mode, *, layers=LAYERS, batch_size=3, shuffle=True, seed=0, split="train"):
    return ActivationLoader(store, split, list(layers), batch_size=batch_size, shuffle=shuffle, seed=seed,
                            config=MODES[mode]())


def epoch_ids(loader, epoch=0):
    loader.set_epoch(epoch)
    return [eid for batch in loader for eid in batch.example_ids]


# --------------------------------------------------------------------------- contents
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_once_with_exact_values(store_and_expected, mode, shuffle):
    store, expected = store_and_expected
    loader = make_loader(store, mode, shuffle=shuffle)
    assert loader.mode == mode.removesuffix("-inline")
    assert loader.num_examples == N_EXAMPLES
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = Counter()
        n_batches = 0
        for batch in loader:
            n_batches += 1
            b, n = batch.mask.shape
            assert 1 <= b <= 3 and len(batch) == b
            assert batch.mask.dtype == torch.bool
            assert batch.labels.dtype == torch.int64 and batch.labels.shape == (b,)
            assert [h.shape for h in batch.hidden_states] == [(b, n, WIDTHS[l]) for l in LAYERS]
            assert all(h.dtype == torch.float32 for h in batch.hidden_states)
            lengths = [expected[eid][1] for eid in batch.example_ids]
            assert n == max(lengths)  # padded to the longest in the batch, no further
            for row, eid in enumerate(batch.example_ids):
                label, length, rows = expected[eid]
                seen[eid] += 1
                assert int(batch.labels[row]) == label
                assert batch.mask[row].tolist() == [True] * length + [False] * (n - length)
                for h, layer in zip(batch.hidden_states, LAYERS):
                    assert torch.equal(h[row, :length], rows[layer])
                    assert torch.all(h[row, length:] == 0)
        assert seen == Counter({eid: 1 for eid in expected})
        assert n_batches == len(loader) == -(-N_EXAMPLES // 3)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_no_shuffle_is_deterministic_and_in_store_order(store_and_expected, mode):
    store, expected = store_and_expected
    loader = make_loader(store, mode, shuffle=False)
    first = epoch_ids(loader, 0)
    assert first == sorted(expected)  # ids were written in source order ex000, ex001, ...
    assert epoch_ids(loader, 1) == first
    assert epoch_ids(make_loader(store, mode, shuffle=False, seed=5), 3) == first


@pytest.mark.parametrize("mode", sorted(MODES))
def test_shuffle_changes_across_epochs_and_repeats_for_same_seed(store_and_expected, mode):
    store, _ = store_and_expected
    loader = make_loader(store, mode, shuffle=True, seed=1)
    e0, e1, e2 = epoch_ids(loader, 0), epoch_ids(loader, 1), epoch_ids(loader, 2)
    assert sorted(e0) == sorted(e1) == sorted(e2)
    assert e0 != e1 and e1 != e2 and e0 != e2
    assert e0 != sorted(e0)  # actually shuffled
    assert epoch_ids(loader, 0) == e0  # same loader, same epoch again
    assert epoch_ids(make_loader(store, mode, shuffle=True, seed=1), 1) == e1  # fresh loader, same seed+epoch
    assert epoch_ids(make_loader(store, mode, shuffle=True, seed=2), 0) != e0  # other seed, other order


@pytest.mark.parametrize("mode", sorted(MODES))
def test_subset_of_layers(store_and_expected, mode):
    store, expected = store_and_expected
    for layers in ([2], [0]):
        loader = make_loader(store, mode, layers=layers, shuffle=False, batch_size=4)
        count = 0
        for batch in loader:
            assert len(batch.hidden_states) == 1
            (h,) = batch.hidden_states
            assert h.shape[-1] == WIDTHS[layers[0]]
            for row, eid in enumerate(batch.example_ids):
                _, length, rows = expected[eid]
                assert torch.equal(h[row, :length], rows[layers[0]])
                count += 1
        assert count == N_EXAMPLES


def test_subset_of_layers_decodes_only_those(store_and_expected, monkeypatch):
    store, _ = store_and_expected
    requested = []
    real_read = store.read_part

    def spy(part, layers=None):
        requested.append(list(layers))
        return real_read(part, layers=layers)

    monkeypatch.setattr(store, "read_part", spy)
    for _ in make_loader(store, "stream", layers=[2], shuffle=True):
        pass
    assert requested and all(r == [2] for r in requested)
    assert len(requested) == len(PART_LENGTHS)  # each part decoded once per epoch


def test_float16_store_is_cast_exactly(tmp_path):
    store, expected = write_store(str(tmp_path / "half.zarr"), dtype="float16", seed=3)
    loader = ActivationLoader(store, "train", [0, 2], batch_size=5, shuffle=False,
                              config=LoaderConfig(mode="memory"), dtype=torch.float32)
    seen = 0
    for batch in loader:
        assert all(h.dtype == torch.float32 for h in batch.hidden_states)
        for row, eid in enumerate(batch.example_ids):
            _, length, rows = expected[eid]
            for h, layer in zip(batch.hidden_states, LAYERS):
                assert torch.equal(h[row, :length], rows[layer].half().float())
                assert torch.all(h[row, length:] == 0)
            seen += 1
    assert seen == N_EXAMPLES


# --------------------------------------------------------------------------- errors
def test_missing_split_raises_store_error(store_and_expected):
    store, _ = store_and_expected
    with pytest.raises(StoreError) as info:
        make_loader(store, "memory", split="validation")
    msg = str(info.value)
    assert "'validation'" in msg and "no committed parts" in msg and "['train']" in msg


def test_split_with_only_uncommitted_parts_raises_store_error(tmp_path):
    store, _ = write_store(str(tmp_path / "s.zarr"))
    writer = store.part_writer("test", 0, n_examples=1, n_tokens=2, source_start=0)
    writer.append({l: torch.ones(2, WIDTHS[l]) for l in LAYERS})  # never finished: not committed
    assert store.parts("test") == []
    with pytest.raises(StoreError, match=r"split 'test' has no committed parts"):
        make_loader(store, "stream", split="test")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_decode_error_propagates_to_consumer(store_and_expected, monkeypatch, mode):
    store, _ = store_and_expected
    real_read = store.read_part

    def failing(part, layers=None):
        if part.index == 2:
            raise RuntimeError(f"boom in {part.name}")
        return real_read(part, layers=layers)

    monkeypatch.setattr(store, "read_part", failing)
    loader = make_loader(store, mode, shuffle=False)
    got = []
    with pytest.raises(RuntimeError, match="boom in part-000002"):
        for batch in loader:
            got.extend(batch.example_ids)
    # stream mode hands out earlier parts' batches before it reaches part 2; nothing from part 2 or later
    assert all(int(eid[2:]) < 8 for eid in got)


def _raise_while_padding(refs):
    raise ValueError("cannot pad")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_collate_error_propagates(store_and_expected, monkeypatch, mode):
    store, _ = store_and_expected
    loader = make_loader(store, mode, shuffle=True)
    monkeypatch.setattr(loader, "_collate", _raise_while_padding)
    with pytest.raises(ValueError, match="cannot pad"):
        next(iter(loader))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_collate_error_closes_the_epoch_plan(store_and_expected, monkeypatch, mode):
    """Regression: an error while padding must close the epoch plan on the producer thread.

    Left suspended (inside the stream plan's `with ThreadPoolExecutor`) and reachable only through the
    traceback's reference cycle, the plan was finalised by the cyclic GC on whatever thread it ran on;
    on zarr's event-loop thread, pool.shutdown(wait=True) then waited for decode workers that need that
    loop, and the process deadlocked. Automatic GC is off here so the outcome does not depend on timing.
    """
    store, _ = store_and_expected
    loader = make_loader(store, mode, shuffle=True)
    monkeypatch.setattr(loader, "_collate", _raise_while_padding)
    gc.disable()
    try:
        with pytest.raises(ValueError, match="cannot pad"):
            next(iter(loader))
        suspended = [
            g for g in gc.get_objects()
            if type(g) is types.GeneratorType and g.gi_frame is not None
            and g.gi_frame.f_locals.get("self") is loader
        ]
        assert not suspended, f"epoch plan left open after the error: {[g.__name__ for g in suspended]}"
    finally:
        gc.enable()
        gc.collect()  # whatever is left is finalised here, on the main thread, where waiting is safe


def test_unknown_layer_is_a_store_error(store_and_expected):
    store, _ = store_and_expected
    with pytest.raises(StoreError) as info:
        make_loader(store, "memory", layers=[0, 1])
    msg = str(info.value)
    assert "[1]" in msg and "[0, 2]" in msg


def _loader_threads():
    return {t for t in threading.enumerate() if t.name == "unipt-loader"}


def run_with_timeout(fn, seconds: float = 10.0):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the test run) if it does not finish."""
    result, error = [], []

    def target():
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised below
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not finish within {seconds} s"
    if error:
        raise error[0]
    return result[0]


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_breaking_out_early_does_not_hang(store_and_expected, mode):
    store, _ = store_and_expected
    loader = ActivationLoader(store, "train", list(LAYERS), batch_size=1, shuffle=True,
                              config=LoaderConfig(mode=mode, shuffle_buffer=2, prefetch_batches=1, prefetch_parts=1,
                                                  background="on"))
    before = _loader_threads()
    it = iter(loader)
    first = run_with_timeout(lambda: next(it))
    assert len(first) == 1
    started = _loader_threads() - before
    assert len(started) == 1
    time.sleep(0.05)  # let the producer fill the (size 1) queue and block on it
    it.close()  # what a `break` out of a for loop does when the iterator is dropped
    for thread in started:
        thread.join(timeout=5)
        assert not thread.is_alive(), "producer thread kept running after the consumer stopped"

    def break_then_full_epoch():
        for _ in loader:
            break
        return sum(len(b) for b in loader)

    assert run_with_timeout(break_then_full_epoch) == N_EXAMPLES
    deadline = time.monotonic() + 5
    while _loader_threads() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (_loader_threads() - before)


def test_background_auto_needs_a_spare_core_or_an_accelerator(store_and_expected, monkeypatch):
    store, _ = store_and_expected
    make = lambda **kw: ActivationLoader(store, "train", list(LAYERS), batch_size=2, shuffle=False,  # noqa: E731
                                         config=LoaderConfig(background="auto"), **kw)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert not make().background and make(accelerator=True).background
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert make().background
    before = _loader_threads()
    inline = ActivationLoader(store, "train", list(LAYERS), batch_size=2, shuffle=False,
                              config=LoaderConfig(background="off"))
    assert sum(len(b) for b in inline) == N_EXAMPLES and not (_loader_threads() - before)


def parts_per_batch(store, config: LoaderConfig, batch_size: int = 16, epochs: int = 4) -> float:
    """Mean number of distinct parts the examples of a batch come from."""
    part_of = {}
    for info in store.parts("train"):
        for example_id in store.read_part(info, layers=[0]).example_id:
            part_of[str(example_id)] = info.index
    counts = []
    for epoch in range(epochs):
        loader = ActivationLoader(store, "train", [0], batch_size=batch_size, shuffle=True, seed=3, config=config)
        loader.set_epoch(epoch)
        counts.extend(len({part_of[i] for i in batch.example_ids}) for batch in loader)
    return float(np.mean(counts))


def test_stream_shuffle_quality_grows_with_the_buffer(tmp_path):
    """The shuffle quality of stream mode, as documented in LoaderConfig.shuffle_buffer: 16 parts of 32
    examples, batches of 16. A uniform shuffle puts examples of 16·(1 − (15/16)^16) ≈ 10.3 parts into a
    batch. Measured: buffer 32 (one part) 3.0 parts per batch, 128 → 7.2, 512 (the split) → 10.2, memory
    mode 10.7."""
    store = write_tiny_store(str(tmp_path / "s.zarr"), widths=(8,), sizes=(("train", 512),))
    store = _split_into_parts(store, tmp_path / "parts.zarr", part_size=32)  # one part -> 16 parts of 32
    stream = [parts_per_batch(store, LoaderConfig(mode="stream", shuffle_buffer=buffer, bucket_batches=1,
                                                  background="off")) for buffer in (32, 128, 512)]
    memory = parts_per_batch(store, LoaderConfig(mode="memory", bucket_batches=1, background="off"))
    assert stream == sorted(stream) and stream[0] >= 2.5, stream  # more buffer, more parts per batch
    assert stream[-1] > 9.5 and memory > 9.5, (stream, memory)  # a buffer of the whole split: a full shuffle


def _split_into_parts(store, url, part_size: int):
    data = store.read_part(store.parts("train")[0])
    out = FeatureStore.create(str(url), layers=store.layers, layer_widths=list(store.layer_widths.values()),
                              dtype=store.dtype, label_names=store.label_names, provenance=store.provenance)
    n = len(data.example_id)
    for k, start in enumerate(range(0, n, part_size)):
        rows = range(start, min(n, start + part_size))
        tokens = int(data.offsets[rows.stop] - data.offsets[rows.start])
        writer = out.part_writer("train", k, n_examples=len(rows), n_tokens=tokens, source_start=start)
        lo, hi = int(data.offsets[rows.start]), int(data.offsets[rows.stop])
        writer.append({layer: data.layers[layer][lo:hi] for layer in store.layers})
        writer.finish(data.example_id[rows.start:rows.stop], data.label[rows.start:rows.stop],
                      data.length[rows.start:rows.stop])
    return FeatureStore.open(str(url))


# --------------------------------------------------------------------------- what stays decoded
def _most_parts_alive(store, monkeypatch, config: LoaderConfig, batch_size: int = 8) -> tuple[int, list[str]]:
    """The most decoded parts alive at once during a shuffled stream epoch, and the epoch's example ids."""
    alive: list[weakref.ref] = []
    read = ActivationLoader._read

    def tracked(self, part):
        data = read(self, part)
        alive.append(weakref.ref(data))
        return data

    monkeypatch.setattr(ActivationLoader, "_read", tracked)
    loader = ActivationLoader(store, "train", [0], batch_size=batch_size, shuffle=True, seed=1, config=config)
    most, ids = 0, []
    for batch in loader:
        most = max(most, sum(ref() is not None for ref in alive))
        ids += batch.example_ids
    return most, ids


def test_stream_frees_parts_whose_examples_mostly_left_the_buffer(tmp_path, monkeypatch):
    """A part stays decoded while any example of it waits in the shuffle buffer: without copying out the last
    examples of mostly consumed parts, a buffer of one part kept many whole parts alive. The copy changes
    no batch."""
    store = write_tiny_store(str(tmp_path / "s.zarr"), widths=(8,), sizes=(("train", 512),))
    store = _split_into_parts(store, tmp_path / "parts.zarr", part_size=32)  # 16 parts of 32
    config = LoaderConfig(mode="stream", shuffle_buffer=32, bucket_batches=1, prefetch_parts=1, background="off")
    most, ids = _most_parts_alive(store, monkeypatch, config)
    with monkeypatch.context() as m:
        m.setattr("unipt.train._loader._compacted", lambda refs: refs)
        most_uncompacted, ids_uncompacted = _most_parts_alive(store, monkeypatch, config)
    # the part being consumed, the one decoding ahead, and one more at most that is over half live
    assert most <= 3, most
    assert most_uncompacted >= 5, most_uncompacted
    assert ids == ids_uncompacted and sorted(ids) == sorted(f"train-{k:03d}" for k in range(512))


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_length_sorted_batches_cover_the_split_with_less_padding(store_and_expected, mode):
    store, expected = store_and_expected
    config = LoaderConfig(mode=mode, bucket_batches=4, prefetch_parts=1, background="off")
    sorted_loader = ActivationLoader(store, "train", list(LAYERS), batch_size=2, shuffle=False, length_sorted=True,
                                     config=config)
    stored_order = ActivationLoader(store, "train", list(LAYERS), batch_size=2, shuffle=False, config=config)
    padded = {}
    for name, loader in (("sorted", sorted_loader), ("stored", stored_order)):
        batches = list(loader)
        ids = [eid for b in batches for eid in b.example_ids]
        assert sorted(ids) == sorted(expected) and len(ids) == N_EXAMPLES
        padded[name] = sum(int((~b.mask).sum()) for b in batches)
        for b in batches:
            for row, eid in enumerate(b.example_ids):
                assert torch.equal(b.hidden_states[1][row, : expected[eid][1]], expected[eid][2][2])
    assert epoch_ids(sorted_loader, 1) == epoch_ids(sorted_loader, 0)  # deterministic, whatever the epoch
    assert padded["sorted"] < padded["stored"], padded


def test_memory_mode_release_frees_the_split_and_decodes_it_again(store_and_expected):
    store, _ = store_and_expected
    loader = make_loader(store, "memory-inline", shuffle=True, seed=2)
    first = [(b.example_ids, [h.clone() for h in b.hidden_states]) for b in loader]
    assert loader._resident is not None
    loader.release()
    assert loader._resident is None
    again = [(b.example_ids, b.hidden_states) for b in loader]
    assert [ids for ids, _ in again] == [ids for ids, _ in first]
    for (_, a), (_, b) in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
