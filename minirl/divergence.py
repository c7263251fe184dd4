"""Reading the ledgers of minirl/ledger.py and finding where the ranks parted.

A process group matches collectives by the order they are issued, so each group's sequence is
compared among its members on its own: the first position where their op, shapes or dtype differ is
where the ranks parted. When a member's sequence simply ends there (it is blocked in a collective of
another group, a crossed order), its last collective elsewhere is shown beside it: both sides of the
wait are named.
"""

import json
import os
from dataclasses import dataclass, field


def kind(op: str) -> str:
    """The collective an op name stands for, whoever issued it: c10d's `alltoall_base_` (eager code),
    the functional `all_to_all_single` (compiled code) and the flight recorder's `all_to_all` are
    all "alltoall"; `_allgather_base_` and `all_gather_into_tensor` are "allgather"."""
    name = op.strip("_")
    for part in ("_base", "_into_tensor", "_tensor", "_single"):
        name = name.replace(part, "")
    return name.replace("_", "")


def signature(entry: dict) -> list:
    """What must match across ranks: the collective, what this rank sends (its shape) and the dtype.
    (The phase may legitimately differ, and so may the op's name: see `kind`.)"""
    return [kind(entry["op"]), entry.get("sent", entry["shapes"]), entry["dtype"]]


def read_ledgers(ledger_dir: str) -> list[list[dict]]:
    """Every rank's lines, in rank order; ranks without a file get an empty ledger."""
    names = os.listdir(ledger_dir) if os.path.isdir(ledger_dir) else []
    paths = {int(name[4:-6]): os.path.join(ledger_dir, name) for name in names
             if name.startswith("rank") and name.endswith(".jsonl") and name[4:-6].isdigit()}
    ledgers = [[] for _ in range(max(paths, default=-1) + 1)]
    for r, path in paths.items():
        with open(path) as f:
            for line in f:
                try:
                    ledgers[r].append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    pass
    return ledgers


def group_labels(ledgers: list[list[dict]]) -> dict[str, str]:
    """Each group's label, from the description lines the ledgers contain."""
    return {e["group_name"]: e["label"] for ledger in ledgers for e in ledger if "group_name" in e}


@dataclass
class Divergence:
    """The first place where the ranks' collectives on one process group differ."""

    group: str
    label: str
    index: int  # position in that group's sequence of collectives
    entries: dict[int, dict | None]  # member rank -> its entry there; None where its ledger ends before
    elsewhere: dict[int, dict] = field(default_factory=dict)  # such a member's last collective (another group)

    def __str__(self) -> str:
        return f"group {self.label} (ranks {list(self.entries)}), its collective {self.index}:" + "".join(
            f"\n  rank {r}: " + (_line(e) if e else "nothing (its ledger ends before)" + (
                f"; its last collective: {_line(self.elsewhere[r])} on group {self.elsewhere[r]['label']}"
                if r in self.elsewhere else "")) for r, e in self.entries.items())

    def short(self) -> str:
        """One line for a table: phase, op, dtype and the first tensor's shape, per rank."""
        return "; ".join(_short(e) if e else "nothing" + (f" (last: {_short(self.elsewhere[r])})"
                                                           if r in self.elsewhere else "")
                         for r, e in self.entries.items())


def _line(e: dict) -> str:
    return f"#{e['n']} {e['phase']:9s} {e['op']} {e['dtype']} {e['shapes']}" + (f"  at {e['site']}" if e.get("site")
                                                                              else "")


def _short(e: dict) -> str:
    return f"{e['phase']} {e['op']} {e['dtype']}{e['shapes'][0] if e['shapes'] else ''}"


def first_divergence(ledgers: list[list[dict]], members: dict[str, list[int]] | None = None) -> Divergence | None:
    """The earliest collective on which the ranks of a group disagree; None if they all agree.

    A process group matches collectives in the order they are issued, so each group's sequence is
    compared on its own, among its members (all ranks with entries where the ledgers do not say):
    same op, shapes and dtype at every position. Of several groups that diverge, the one whose
    divergence was issued first (smallest `n`) is reported.
    """
    described = {e["group_name"]: e["ranks"] for ledger in ledgers for e in ledger if "group_name" in e}
    members = {**described, **(members or {})}
    labels = group_labels(ledgers)
    found = []
    for g in dict.fromkeys(e["group"] for ledger in ledgers for e in ledger if "op" in e):
        ranks = members.get(g) or [r for r, ledger in enumerate(ledgers) if any(e.get("group") == g for e in ledger)]
        seqs = {r: [e for e in ledgers[r] if e.get("group") == g] if r < len(ledgers) else [] for r in ranks}
        for i in range(max(map(len, seqs.values()))):
            got = {r: s[i] if i < len(s) else None for r, s in seqs.items()}
            if len({json.dumps(e and signature(e)) for e in got.values()}) > 1:
                last = {r: {**ops[-1], "label": labels.get(ops[-1]["group"], ops[-1]["group"])}
                        for r in got if got[r] is None and r < len(ledgers)
                        for ops in [[e for e in ledgers[r] if "op" in e]] if ops and ops[-1]["group"] != g}
                found.append((min(e["n"] for e in got.values() if e), Divergence(g, labels.get(g, g), i, got, last)))
                break
    return min(found, key=lambda f: f[0])[1] if found else None


def report(ledger_dir: str) -> str:
    """Each rank's notes, last collective and end, then the first divergence: what a user reads."""
    ledgers = read_ledgers(ledger_dir)
    lines = [f"ledgers in {ledger_dir}:"]
    for r, ledger in enumerate(ledgers):
        ops = [e for e in ledger if "op" in e]
        end = next((e for e in reversed(ledger) if "end" in e), None)
        lines += [f"  rank {r}: {e['note']}" for e in ledger if "note" in e]
        last = f", last #{ops[-1]['n']} {ops[-1]['op']} at {ops[-1].get('site', '?')}" if ops else ""
        ended = f"; {end['end']} {end.get('error', '')}" if end else "; no end (still running or killed)"
        lines.append(f"  rank {r}: {len(ops)} collectives{last}{ended}")
    divergence = first_divergence(ledgers)
    lines.append(f"first divergent collective: {divergence}" if divergence else
                 "the ledgers agree (as far as each got)")
    return "\n".join(lines)
