"""Evaluation metrics for fine-tuning: accuracy, per-class and macro F1, entity-level F1.

Written here (pure Python) so evaluation needs no sklearn/seqeval. The conventions follow
them: an undefined precision/recall/F1 (nothing predicted, or no support) counts as 0 with no
warning, and entities follow conlleval (what seqeval's default mode also does).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence


def _check_lengths(y_true: Sequence, y_pred: Sequence) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def _sorted_labels(labels: set) -> list:
    """Sorted if the labels compare (ints with ints, str with str), else by their text."""
    try:
        return sorted(labels)
    except TypeError:
        return sorted(labels, key=str)


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of positions where the prediction equals the truth (0.0 for no items)."""
    _check_lengths(y_true, y_pred)
    return _ratio(sum(t == p for t, p in zip(y_true, y_pred)), len(y_true))


def per_class(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> dict:
    """{label: {precision, recall, f1, support}} for each of `labels`, 0 where undefined."""
    _check_lengths(y_true, y_pred)
    true_count = Counter(y_true)
    pred_count = Counter(y_pred)
    hits = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    out = {}
    for label in labels:
        precision = _ratio(hits[label], pred_count[label])
        recall = _ratio(hits[label], true_count[label])
        out[label] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                      "support": true_count[label]}
    return out


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Optional[Sequence] = None) -> float:
    """Unweighted mean of per-class F1, so rare classes count as much as common ones.

    `labels` defaults to every label present in y_true or y_pred (as sklearn does).
    """
    if labels is None:
        labels = _sorted_labels(set(y_true) | set(y_pred))
    if not labels:
        return 0.0
    scores = per_class(y_true, y_pred, labels)
    return sum(s["f1"] for s in scores.values()) / len(scores)


def classification_report(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> str:
    """A table for humans: per-class precision/recall/f1/support, then accuracy and macro avg."""
    scores = per_class(y_true, y_pred, labels)
    names = [str(label) for label in labels]
    width = max([len(n) for n in names] + [len("macro avg")])
    lines = [f"{'':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"]
    for name, label in zip(names, labels):
        s = scores[label]
        lines.append(f"{name:<{width}}  {s['precision']:>9.4f}  {s['recall']:>9.4f}  {s['f1']:>9.4f}  {s['support']:>9d}")
    lines.append("")
    lines.append(f"{'accuracy':<{width}}  {'':>9}  {'':>9}  {accuracy(y_true, y_pred):>9.4f}  {len(y_true):>9d}")
    n = len(labels) or 1
    mp = sum(s["precision"] for s in scores.values()) / n
    mr = sum(s["recall"] for s in scores.values()) / n
    mf = sum(s["f1"] for s in scores.values()) / n
    lines.append(f"{'macro avg':<{width}}  {mp:>9.4f}  {mr:>9.4f}  {mf:>9.4f}  {len(y_true):>9d}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entities


def _split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type): "B-PER" -> ("B", "PER"); "O" -> ("O", ""); a bare "PER" is ("I", "PER")."""
    if tag == "O" or not tag:
        return "O", ""
    if len(tag) >= 2 and tag[1] == "-" and tag[0] in "BIESO":
        return tag[0], tag[2:]
    return "I", tag  # IO tagging: runs of the same bare tag are one entity


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities as (type, start, end-exclusive) from BIO/IOB2 tags, by conlleval's rules.

    An I- tag after O, after a tag of another type, or at the start begins an entity (so IOB1
    tagging and sloppy model output still count); B- always begins one. E-/S- (IOBES) are also
    understood: E- ends an entity, S- is a one-token entity. Bare tags ("PER") are IO tagging.
    """
    entities: set[tuple[str, int, int]] = set()
    prev_prefix, prev_type = "O", ""
    start: Optional[int] = None
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel closes an entity at the end
        prefix, typ = _split_tag(tag)
        # Does an entity end before position i?
        if start is not None:
            ends = (prev_prefix in ("E", "S")
                    or prefix in ("B", "S", "O")
                    or typ != prev_type)
            if ends:
                entities.add((prev_type, start, i))
                start = None
        # Does one begin at position i?
        if prefix in ("B", "S"):
            start = i
        elif prefix in ("I", "E") and start is None:  # I- after O/E-/S- or another type
            start = i
        prev_prefix, prev_type = prefix, typ
    return entities


def entity_prf(true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision/recall/F1, micro-averaged over all entities (as conlleval/seqeval).

    An entity counts as found only with the same type and the exact same span. Returns
    {precision, recall, f1, support, per_type: {type: {precision, recall, f1, support}}}.
    """
    if len(true_seqs) != len(pred_seqs):
        raise ValueError(f"{len(true_seqs)} true sentences but {len(pred_seqs)} predicted")
    n_true: Counter = Counter()
    n_pred: Counter = Counter()
    n_hit: Counter = Counter()
    for k, (true_tags, pred_tags) in enumerate(zip(true_seqs, pred_seqs)):
        if len(true_tags) != len(pred_tags):
            raise ValueError(f"sentence {k}: {len(true_tags)} true tags but {len(pred_tags)} predicted")
        gold = bio_entities(true_tags)
        guess = bio_entities(pred_tags)
        n_true.update(e[0] for e in gold)
        n_pred.update(e[0] for e in guess)
        n_hit.update(e[0] for e in gold & guess)
    per_type = {}
    for typ in _sorted_labels(set(n_true) | set(n_pred)):
        p = _ratio(n_hit[typ], n_pred[typ])
        r = _ratio(n_hit[typ], n_true[typ])
        per_type[typ] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": n_true[typ]}
    p = _ratio(sum(n_hit.values()), sum(n_pred.values()))
    r = _ratio(sum(n_hit.values()), sum(n_true.values()))
    return {"precision": p, "recall": r, "f1": _f1(p, r), "support": sum(n_true.values()), "per_type": per_type}
