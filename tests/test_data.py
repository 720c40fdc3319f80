"""Data pipeline: packing, document ids, line-by-line examples, caching, and the batch schedule."""

from __future__ import annotations

import itertools

import numpy as np

from bigtrain.config import load_config
from bigtrain.data import BatchSchedule, TokenBlocks, prepare, to_model_batch
from reference_packing import pack


def classic_group_texts(docs: list[list[int]], eos: int, block: int) -> list[list[int]]:
    """transformers' run_clm recipe: concatenate (here with EOS after each doc), cut into blocks."""
    concatenated = list(itertools.chain.from_iterable(d + [eos] for d in docs if d))
    total = (len(concatenated) // block) * block
    return [concatenated[i : i + block] for i in range(0, total, block)]


def test_pack_matches_classic_group_texts_and_tracks_documents():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 100, size=n)) for n in [5, 0, 17, 3, 40, 1, 9, 0, 22]]
    flat = np.array(list(itertools.chain.from_iterable(docs)), dtype=np.int64)
    lengths = np.array([len(d) for d in docs])
    ids, segs = pack(flat, lengths, eos_id=0, seq_len=8)
    assert ids.tolist() == classic_group_texts(docs, 0, 8)
    # Segment ids change exactly after each EOS, and start at 0 in every block.
    for row_ids, row_segs in zip(ids, segs):
        assert row_segs[0] == 0
        for j in range(1, len(row_ids)):
            assert row_segs[j] - row_segs[j - 1] == (1 if row_ids[j - 1] == 0 else 0)


def test_schedule_splits_global_batches_disjointly_across_ranks():
    indices = np.arange(100)
    world, micro, accum = 2, 3, 2
    global_batch = world * micro * accum
    scheds = [BatchSchedule(indices, global_batch, micro, world, r, seed=7) for r in range(world)]
    seen = []
    for step in range(8):  # crosses an epoch boundary (8 batches per epoch)
        pos = step * global_batch
        parts = [np.concatenate(s.micro_batches(pos)) for s in scheds]
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == global_batch  # no sample twice in one step
        seen.append(union)
    epoch0 = np.concatenate(seen[:8])
    assert len(set(epoch0.tolist())) == 96  # one epoch: every sample at most once
    # The same seed gives the same order; another seed another one.
    again = BatchSchedule(indices, global_batch, micro, world, 0, seed=7).micro_batches(5 * global_batch)
    assert all((a == b).all() for a, b in zip(again, scheds[0].micro_batches(5 * global_batch)))
    other = BatchSchedule(indices, global_batch, micro, world, 0, seed=8).micro_batches(0)
    assert not all((a == b).all() for a, b in zip(other, scheds[0].micro_batches(0)))


def test_schedule_position_is_world_size_independent():
    """Global batch k holds the same samples at world size 1 and 2 (resume at another world size)."""
    indices = np.arange(64)
    one = BatchSchedule(indices, 8, 4, 1, 0, seed=3)
    two = [BatchSchedule(indices, 8, 4, 2, r, seed=3) for r in range(2)]
    for pos in (0, 8, 40, 72):
        a = np.sort(np.concatenate(one.micro_batches(pos)))
        b = np.sort(np.concatenate([np.concatenate(s.micro_batches(pos)) for s in two]))
        assert (a == b).all()


def test_line_by_line_pads_and_masks_loss(tmp_path, cache_dir):
    f = tmp_path / "lines.txt"
    lines = ["short line", "", "a much longer line " * 20, "   ", "third line here"] * 30
    f.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"data.train_files={f}", "data.vocab_size=300", "data.seq_len=16", "data.mode=line_by_line"])
    p = prepare(cfg, log=lambda *a: None)
    blocks = TokenBlocks(p.train_path)
    assert len(blocks) == 90  # blank lines dropped
    batch = to_model_batch(blocks.take(np.arange(3)), pad_id=1)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[1] == 16  # the long line is truncated to seq_len
    assert lengths[0] < 16 and lengths[2] < 16
    for row, n in enumerate(lengths):
        assert (batch["labels"][row, n:] == -100).all()
        assert (batch["labels"][row, :n] == batch["input_ids"][row, :n]).all()


def test_datasets_dir_parquet_and_jsonl_sources_give_the_same_stream(tmp_path):
    """The same documents as a `datasets` directory, a Parquet file and JSON lines (plain, gzip,
    zstandard): prepared with
    the same tokenizer, the same token stream and document ends."""
    import datasets

    from bigtrain.prepare import prepare_dataset
    from bigtrain.shards import open_prepared

    texts = [f"document number {i} says hello to the world " * 5 for i in range(200)] + [""]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict({"body": texts}).to_parquet(str(tmp_path / "d.parquet"))
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join('{"text": "%s"}\n' % t for t in texts))
    import gzip

    import zstandard

    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(jl.read_bytes()))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jl.read_bytes()))
    streams, tok = [], []
    for src, field in ((tmp_path / "saved", "text"), (tmp_path / "d.parquet", "body"), (jl, "text"),
                       (tmp_path / "d.jsonl.gz", "text"), (tmp_path / "d.jsonl.zst", "text")):
        cfg = load_config(None, [f"data.train_files={src}", "data.vocab_size=300", f"data.text_field={field}", *tok])
        out = prepare_dataset(cfg, tmp_path / f"out-{len(streams)}", workers=1, log=lambda *a: None)
        tok = tok or [f"data.tokenizer={out / 'tokenizer'}"]
        stream = open_prepared(out, "test").sources["train"]
        streams.append((stream.read(0, stream.n_tokens), stream.ends_between(0, stream.n_tokens + 1)))
    assert streams[0][0].size > 1000 and len(streams[0][1]) == 200  # the empty document is no document
    for ids, ends in streams[1:]:
        np.testing.assert_array_equal(ids, streams[0][0])
        np.testing.assert_array_equal(ends, streams[0][1])
