"""Data pipeline: packing, document ids, line-by-line examples, input formats."""

from __future__ import annotations

import itertools

import numpy as np

from bigtrain.config import load_config
from bigtrain.data import to_model_batch
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


def test_line_by_line_pads_masks_and_reads_the_prepared_shards(tmp_path, cache_dir):
    """data.mode=line_by_line reads the same prepared shards as packed data, one example per
    non-empty line: each example is the line's own tokens (the tokenizer's, no EOS), truncated to
    seq_len, padded, and padding is neither attended to nor learned."""
    from bigtrain.corpus import ShardData, ensure_prepared
    from bigtrain.mixture import MixtureSchedule
    from bigtrain.tokenizer import load_tokenizer

    f = tmp_path / "lines.txt"
    lines = ["short line", "", "a much longer line " * 20, "   ", "third line here"] * 30
    f.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"data.train_files={f}", "data.vocab_size=300", "data.seq_len=16", "data.mode=line_by_line",
                             "data.valid_fraction=0.1", "data.sample_by=paragraph"])  # line_by_line reads lines whatever sample_by says
    data = ShardData(cfg, ensure_prepared(cfg, log=lambda *a: None))
    assert len(data.train) == 90  # blank and whitespace-only lines are no examples
    tok = load_tokenizer(data.tokenizer_dir)
    batch = to_model_batch(data.train.take(np.arange(3)), pad_id=tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1).tolist()
    for row, line in enumerate(["short line", "a much longer line " * 20, "third line here"]):
        want = tok(line, add_special_tokens=False)["input_ids"][:16]
        assert lengths[row] == len(want) and batch["input_ids"][row, : len(want)].tolist() == want
        assert (batch["input_ids"][row, len(want):] == tok.pad_token_id).all()
        assert (batch["labels"][row, len(want):] == -100).all()
        assert (batch["labels"][row, : len(want)] == batch["input_ids"][row, : len(want)]).all()
    assert lengths[1] == 16 and lengths[0] < 16  # the long line is truncated to seq_len
    # The one schedule holds out 9 of the 90 examples and trains on the other 81, each once per epoch.
    sched = data.schedule(9, 9, 1, 0, cfg.train.seed)
    assert isinstance(sched, MixtureSchedule) and len(data.valid_ids) == 9
    epoch = np.concatenate([sched.global_ids(k * 9) for k in range(9)])
    assert sorted(epoch.tolist()) == sorted(set(range(90)) - set(data.valid_ids.tolist()))


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


def test_every_task_takes_the_same_batches_at_any_world_size(tmp_path, cache_dir, corpus):
    """The one data path, for clm, mlm, line_by_line, a labeled task and chat SFT: global batch k
    of 8 samples is the same at world size 1 (micro 4, accum 2) and 2 (micro 4 per rank): micro-step
    m of the one process is rank m's micro-batch, sample ids and tensors alike (masks too), so a
    resume at another world size continues the same stream. Across epochs no held-out sample is
    trained on."""
    import json

    from bigtrain.tasks import build_task
    from bigtrain.tokenizer import load_tokenizer

    tsv = tmp_path / "labels.tsv"
    tsv.write_text("".join(f"{'yes' if i % 3 else 'no'}\tsentence number {i} is {'fine' if i % 3 else 'bad'}\n" for i in range(40)))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                                                      {"role": "assistant", "content": str(i + 1)}]}) + "\n" for i in range(30)))
    text = [f"data.train_files=[{corpus}/json_*]"]
    configs = {
        "clm": text, "mlm": ["task=mlm", *text], "line_by_line": ["data.mode=line_by_line", *text],
        "classify": ["task=classify", f"data.train_files={tsv}", "data.valid_fraction=0.25"], "sft": ["task=sft", f"data.train_files={chats}"],
    }
    quiet = lambda *a: None  # noqa: E731
    for name, args in configs.items():
        cfg = load_config(None, [*args, "data.vocab_size=300", "data.seq_len=32", f"output_dir={tmp_path / name}"])
        task = build_task(cfg)
        task.prepare(0, False, quiet)
        task.open()
        task.load(load_tokenizer(task.tokenizer_dir))
        one = task.schedule(8, 4, 1, 0, cfg.train.seed)
        two = [task.schedule(8, 4, 2, r, cfg.train.seed) for r in range(2)]
        held = set(getattr(task, "valid_indices", []).tolist()) if name != "sft" and task.cfg.data.valid_files is None else set()
        trained = set()
        for step in (0, 1, 7, 40):  # step 40 is past an epoch of every one of these datasets
            pos = step * 8
            a, b = one.micro_batches(pos), [s.micro_batches(pos)[0] for s in two]
            for m in range(2):
                assert a[m].tolist() == b[m].tolist(), (name, step, m)
                x, y = task.batch(a[m], pos), task.batch(b[m], pos)
                assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x), (name, step, m)
            trained.update(one.global_ids(pos))
        assert trained and not trained & held, name
        if name in ("clm", "classify"):
            assert held, name  # the hold-out is really there to be kept apart
