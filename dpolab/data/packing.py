"""Shared-prefix packing: every pair as ONE segment prompt + chosen + rejected, segments packed into few rows.

The padded layout (``collate.PreferenceCollator``) runs each prompt twice (once before each continuation) and pads
every row to the longest; with Penn-shaped pairs about a third of its tokens are padding. Here a pair
(x, y_w, y_l) of lengths P, C, R becomes one segment of P + C + R tokens

    tokens     x_1 .. x_P   y_w,1 .. y_w,C   y_l,1 .. y_l,R
    position   0  .. P-1    P     .. P+C-1   P     .. P+R-1        (y_l restarts where y_w started)
    branch     0            1                2

and a token at (position q, branch b) attends to a token of the same segment at (position k, branch b') iff

    k <= q  and  (b' = 0  or  b' = b)                                                                   (6.9)

so y_l sees the prompt and its own past, never y_w: each continuation's hidden states, hence its log-probs, are
exactly those of the separate sequence x + y (appendix notebook 12 shows it). When ``keep_end`` truncation kept different
ends of a long prompt for y_w and y_l (``dpolab.data.tokenize``), x is only what the two kept sequences share at
their start (often nothing) and each branch begins with its own kept prompt tokens, which are attended to but not
scored: the branch is then exactly the kept sequence TRL's collator builds. Segments are packed into rows of about
``row_tokens`` tokens, longest first onto the shortest row, and only the rows' ends are padded. The first token
of each continuation is predicted by the prompt's last position, so that position is scored twice.

A ranking of K completions (``completions_ids``, best first) is one segment the same way with K branches:

    tokens     x_1 .. x_P   y_1,1 .. y_1,C1   ...   y_K,1 .. y_K,CK
    position   0  .. P-1    P     .. P+C1-1   ...   P     .. P+CK-1
    branch     0            1                 ...   K

and (6.9) unchanged lets each y_k see the prompt and its own past only, so the prompt runs once for K sequences:
P + C1 + ... + CK tokens where K separate sequences take K*P + C1 + ... + CK. A pair is the case K = 2, token for
token the same batch. The rows' padded ends take branch id K + 1 (3 for pairs), a segment of their own each.

The batch carries what ``dpolab.logprobs.packed_logps`` needs: ``input_ids``, ``position_ids``, ``segment_ids``,
``branch_ids`` (R, L); the scored positions ``score_index`` (n,) into the flattened (R*L) positions, their
``labels`` (n,) and ``score_sequence`` (n,), the sequence each scores (0..B-1 chosen, B..2B-1 rejected, the order
of the padded layout; for rankings, k*B + i for completion k of example i); and ``index`` (B,), the examples'
dataset indices.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .collate import completion_parts, n_completions

__all__ = ["PackedPreferenceCollator", "unpack", "PROMPT", "CHOSEN", "REJECTED", "PADDING"]

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3  # branch ids of a pair batch; completion k of a ranking is k + 1,
# its padding K + 1


@dataclass(frozen=True)
class PackedPreferenceCollator:
    """Tokenized examples (``tokenize_pair``'s dicts) -> one shared-prefix packed batch (module docstring)."""

    pad_token_id: int  # the id written into the rows' padded ends (each padding token attends only to itself)
    row_tokens: int = 256  # target tokens per packed row; a longer segment gets a row of its own length
    pad_to_multiple_of: int | None = None  # round the row length up to a multiple of this

    def __post_init__(self):
        if not isinstance(self.row_tokens, int) or self.row_tokens < 1:
            raise ValueError(f"row_tokens must be an int >= 1, got {self.row_tokens!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")

    def rows_of(self, lengths: list[int]) -> list[list[int]]:
        """Which segments go in which row. At least as many rows as ``row_tokens`` asks (k), and of k, k+1, k+2 rows
        the count that pads least (the batch is rows x the longest row); each segment, longest first, goes onto the
        row with the fewest tokens so far (LPT scheduling: rows end up within one segment of each other)."""
        k = max(1, math.ceil(sum(lengths) / max(self.row_tokens, max(lengths))))
        options = [self._lpt(lengths, n) for n in range(k, min(k + 2, len(lengths)) + 1)]
        return min(options, key=lambda rows: len(rows) * max(sum(lengths[i] for i in row) for row in rows))

    @staticmethod
    def _lpt(lengths: list[int], n_rows: int) -> list[list[int]]:
        heap = [(0, r) for r in range(n_rows)]
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            total, r = heapq.heappop(heap)
            rows[r].append(i)
            heapq.heappush(heap, (total + lengths[i], r))
        return [sorted(row) for row in rows if row]

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        B, K = len(examples), n_completions(examples)
        # per example: the shared prompt, then each branch = its own kept prompt (usually empty) + its completion
        parts = [(list(ex["prompt_ids"]), completion_parts(ex)) for ex in examples]
        lengths = [len(p) + sum(len(o) + len(c) for o, c in branches) for p, branches in parts]
        rows = self.rows_of(lengths)
        L = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), L)
        input_ids = np.full(shape, self.pad_token_id, dtype=np.int64)
        position_ids = np.zeros(shape, dtype=np.int64)
        segment_ids = -1 - np.arange(len(rows) * L, dtype=np.int64).reshape(shape)  # padding: a segment each
        branch_ids = np.full(shape, K + 1, dtype=np.int64)  # padding: PADDING for pairs
        score_index, labels, score_sequence = [], [], []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                prompt, branches = parts[i]
                P = len(prompt)
                segment_tokens, positions, kinds, offsets = list(prompt), list(range(P)), [PROMPT] * P, []
                for k, (own, completion) in enumerate(branches):
                    offsets.append(len(segment_tokens))
                    branch = own + completion
                    segment_tokens += branch
                    positions += range(P, P + len(branch))
                    kinds += [k + 1] * len(branch)
                sl = slice(start, start + len(segment_tokens))
                input_ids[r, sl] = segment_tokens
                position_ids[r, sl] = positions
                segment_ids[r, sl] = i
                branch_ids[r, sl] = kinds
                flat = r * L + start
                for k, ((own, completion), offset) in enumerate(zip(branches, offsets)):
                    # token q of the branch sits at offset + q and is predicted by the position before it in its
                    # own sequence: offset + q - 1, or the prompt's last token P - 1 for q = 0; the branch's own
                    # prompt tokens (q < len(own)) are context, not scored
                    branch = segment_tokens[offset : offset + len(own) + len(completion)]
                    for q in range(len(own), len(branch)):
                        before = flat + offset + q - 1 if q else flat + P - 1
                        if not q and not P:  # nothing before the first token: no predictor (as when padded)
                            continue
                        score_index.append(before)
                        labels.append(branch[q])
                        score_sequence.append(k * B + i)
                start += len(segment_tokens)
        batch = {
            "input_ids": torch.from_numpy(input_ids),  # (R, L)
            "position_ids": torch.from_numpy(position_ids),  # (R, L)
            "segment_ids": torch.from_numpy(segment_ids),  # (R, L)
            "branch_ids": torch.from_numpy(branch_ids),  # (R, L)
            "score_index": torch.tensor(score_index, dtype=torch.long),  # (n,)
            "labels": torch.tensor(labels, dtype=torch.long),  # (n,)
            "score_sequence": torch.tensor(score_sequence, dtype=torch.long),  # (n,)
        }
        if all("index" in ex for ex in examples):
            batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)  # (B,)
        return batch


def unpack(batch: Mapping[str, torch.Tensor], n_completions: int = 2) -> list[dict[str, Any]]:
    """The examples of a packed batch of ``n_completions`` branches per segment, in its order (0..B-1), as
    ``PackedPreferenceCollator`` was given them: pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, with
    ``chosen_prompt_ids`` / ``rejected_prompt_ids`` where a branch begins with prompt tokens of its own) or, for
    K > 2, rankings (``prompt_ids``, ``completions_ids``, ``completions_prompt_ids``), and ``index`` where the batch
    has it; for the padded layout of the same examples (``collate.PreferenceCollator``). A branch's completion is
    its last tokens, as many as its sequence scores (one more when nothing precedes it, whose first token has no
    predictor): the padded layout then scores the same tokens."""
    K = n_completions
    n_examples = int(batch["segment_ids"].max()) + 1
    prompts: list[list[int]] = [[] for _ in range(n_examples)]
    branches: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(n_examples)]
    tokens, segments, kinds = (batch[k].flatten().tolist() for k in ("input_ids", "segment_ids", "branch_ids"))
    for token, segment, branch in zip(tokens, segments, kinds):  # a segment's tokens are contiguous, in order
        if segment >= 0:
            (prompts[segment] if branch == PROMPT else branches[segment][branch - 1]).append(token)
    scored = torch.bincount(batch["score_sequence"], minlength=K * n_examples).tolist()
    examples = []
    for i in range(n_examples):
        own, completions = [], []
        for k, branch in enumerate(branches[i]):
            n = scored[k * n_examples + i] + (not prompts[i] and scored[k * n_examples + i] == len(branch) - 1)
            own.append(branch[: len(branch) - n])
            completions.append(branch[len(branch) - n :])
        if K == 2:
            example = {"prompt_ids": prompts[i], "chosen_ids": completions[0], "rejected_ids": completions[1]}
            if any(own):
                example["chosen_prompt_ids"], example["rejected_prompt_ids"] = own
        else:
            example = {"prompt_ids": prompts[i], "completions_ids": completions}
            if any(own):
                example["completions_prompt_ids"] = own
        examples.append(example)
    if "index" in batch:
        for example, index in zip(examples, batch["index"].tolist()):
            example["index"] = index
    return examples
