"""Padding-free policy passes: sequences packed into rows without pads, micro-batches cut by tokens.

A padded micro-batch is a rectangle [rows, longest sequence]: every pad is computed, forward and
backward, through every layer. Packed, a micro-batch's sequences (prompt + answer, no pads) are
laid end to end, first-fit decreasing, into rows of at most ``pack_length`` tokens:

    row 0: [p p p a a a | p p a a a a a | p a a]      position ids 0 1 2 3 4 5 | 0 1 2 3 4 5 6 | 0 1 2
    row 1: [p p p p a a a a a a | pad pad]            position ids 0 .. 9 | 0 1

Position ids restart at 0 at each sequence and no attention mask is passed: transformers
(masking_utils.find_packed_sequence_indices, from 4.56) then cuts the causal mask into one block
per run of consecutive positions, for eager and sdpa attention alike, sliding windows included
(the window is measured in position ids). A row's tail of pads is a block of its own (positions
0, 1, ...) that no real token sees. Flash-attention's variable-length kernels read the same
position ids as sequence boundaries.

Eager and sdpa attention cost the square of a row's length, in time and in the scores eager keeps
for the backward, so rows are bounded: ``PACK_LENGTH=auto`` is the step's longest sequence, and a
packed row never costs more attention than a padded one. With a variable-length kernel
(flash-attention 2/3) a row costs what its sequences cost, and auto is one row per micro-batch.

Micro-batches (``micro_batch_rows``) are cut after packing: the step's sequences are packed together,
the rows sorted by length, and each micro-batch takes consecutive rows, as many as MICRO_BATCH_SIZE
padded rows of the longest sequence would hold (a padded micro-batch's rectangle bounds a packed
one's, so memory never grows), or up to MICRO_BATCH_TOKENS real tokens. Packing the step rather than each micro-batch fills the rows
better (more small sequences to fill the gaps beside the long ones), and sorting puts rows of like
lengths in one rectangle, as long as its longest row. On GSM8K-like lengths (40 to 256 tokens) rows
of at most the longest sequence cannot come within 10% of the real tokens (every sequence longer
than half of it needs a row of its own); the sorted rectangles are within a few percent.

A ``PassLayout`` says where everything is: the positions whose hidden states predict an answer
token (the output head runs on those alone, common.logprobs' ``from_position`` as a set), where
each result goes in the [sequences, width] per-token tensors the losses read (answer token j of
sequence i at column j, 0 past its end), and each sequence's last position (PPO's bootstrap
value). The padded layout is the same record with an attention mask, so one code path serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from importlib import metadata

import torch
from tqdm import tqdm

# Attention implementations whose packed results the tests check against the padded ones.
PACKED_ATTENTIONS = frozenset({"eager", "sdpa"})
# Variable-length kernels: one row per micro-batch costs no more than its sequences.
VARLEN_ATTENTIONS = frozenset({"flash_attention_2", "flash_attention_3"})


def first_fit_decreasing(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity`` (None: one bin),
    first-fit decreasing (longest first, each into the first bin with room; at most 11/9 OPT + 1
    bins). An item longer than ``capacity`` gets a bin of its own."""
    if capacity is None:
        return [sorted(range(len(lengths)), key=lambda i: -lengths[i])] if lengths else []
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, space in enumerate(room):
            if lengths[index] <= space:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


_noted_long_sequences = False


def token_budget_ranges(lengths: list[int], micro_batch_size: int, micro_batch_tokens: int = 0) -> list[slice]:
    """Consecutive micro-batches of the sequences of ``lengths``, as slices: ``micro_batch_size``
    sequences each, or (micro_batch_tokens > 0) as many whole sequences as fit in that many tokens.
    A sequence longer than the budget gets a micro-batch of its own (said once per run). The loss
    normaliser is the step's, so the grouping does not change the update."""
    global _noted_long_sequences
    if micro_batch_tokens <= 0:
        return [slice(start, min(start + micro_batch_size, len(lengths)))
                for start in range(0, len(lengths), micro_batch_size)]
    ranges, start, tokens = [], 0, 0
    for index, length in enumerate(lengths):
        if index > start and tokens + length > micro_batch_tokens:
            ranges.append(slice(start, index))
            start, tokens = index, 0
        tokens += length
        if length > micro_batch_tokens and not _noted_long_sequences:
            _noted_long_sequences = True
            tqdm.write(f"note: a sequence of {length} tokens is longer than MICRO_BATCH_TOKENS={micro_batch_tokens}: "
                       f"it gets a micro-batch of its own (said once)")
    if start < len(lengths):
        ranges.append(slice(start, len(lengths)))
    return ranges


def micro_batch_rows(lengths: list[int], micro_batch_size: int, micro_batch_tokens: int, packing: bool,
                     pack_length: int | None) -> list[list[list[int]]]:
    """The micro-batches of sequences of ``lengths`` (a step's, or a mini-batch's), each a list of rows,
    each row a list of sequence indices.

    Padded: one sequence per row, consecutive sequences, ``micro_batch_size`` per micro-batch, or
    (``micro_batch_tokens`` > 0) as many as fit in that many tokens (``token_budget_ranges``).
    Packed: every sequence first-fit decreasing into rows of at most ``pack_length`` tokens (and of
    the token budget), the rows sorted longest first, then consecutive rows per micro-batch: as many
    as a padded micro-batch's rectangle holds (micro_batch_size x the longest sequence positions,
    counted at the micro-batch's longest row; so never more activations, nor attention, than padded),
    or as many as fit in ``micro_batch_tokens`` real tokens. ``pack_length`` None (a variable-length
    kernel): one row per micro-batch, of that rectangle's tokens or the budget."""
    if not lengths:
        return []
    if not packing:
        return [[[index] for index in range(cut.start, cut.stop)]
                for cut in token_budget_ranges(lengths, micro_batch_size, micro_batch_tokens)]
    rectangle = micro_batch_size * max(lengths)  # the positions of a padded micro-batch of the longest
    if pack_length is None:
        capacity = micro_batch_tokens or rectangle
    else:
        capacity = min(pack_length, micro_batch_tokens) if micro_batch_tokens else pack_length
    rows = first_fit_decreasing(lengths, capacity)
    fills = [sum(lengths[index] for index in row) for row in rows]
    by_length = sorted(range(len(rows)), key=lambda row: -fills[row])
    rows, fills = [rows[row] for row in by_length], [fills[row] for row in by_length]
    if pack_length is None:
        return [[row] for row in rows]
    if micro_batch_tokens:
        return [rows[cut] for cut in token_budget_ranges(fills, micro_batch_size, micro_batch_tokens)]
    micro_batches, start = [], 0
    while start < len(rows):  # the rows sorted: a micro-batch's rectangle is as long as its first row
        count = max(1, rectangle // fills[start])
        micro_batches.append(rows[start:start + count])
        start += count
    return micro_batches


@dataclass
class PassLayout:
    """Model inputs of one micro-batch and where its answer tokens are in them (see the module docstring)."""
    input_ids: torch.Tensor               # [R, L]
    position_ids: torch.Tensor            # [R, L]
    attention_mask: torch.Tensor | None   # [R, L] padded rectangles; None packed
    predicting: torch.Tensor              # [T] flat positions (of R * L) whose hidden state predicts an answer token
    destination: torch.Tensor             # [T] flat index (of num_sequences * width) of that token's entry
    last_position: torch.Tensor           # [num_sequences] flat position of each sequence's last token
    num_sequences: int
    width: int                            # columns of the per-token results
    real_tokens: int                      # tokens of the sequences (R * L minus the pads)

    @property
    def computed_positions(self) -> int:
        return int(self.input_ids.numel())

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """[num_sequences, width] from [T] values at ``predicting``: entry [i, j] that of answer token j
        of sequence i, 0 past its end. Differentiable."""
        out = values.new_zeros(self.num_sequences * self.width)
        return out.index_copy(0, self.destination, values).view(self.num_sequences, self.width)

    def gather(self, per_position: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows ``positions`` of ``per_position`` [R, L, ...] flattened to [R * L, ...]."""
        return per_position.flatten(0, 1).index_select(0, positions)


def pass_layout(sequences: list[torch.Tensor], answer_lengths: list[int], width: int, pack_length: int | None,
                packing: bool, pad_token_id: int, rows: list[list[int]] | None = None) -> PassLayout:
    """The layout of ``sequences`` (1-D token ids, prompt then answer, no pads), the last
    ``answer_lengths[i]`` tokens of sequence i being its answer (each after a prompt of >= 1 token),
    on the CPU. ``packing``: rows of at most ``pack_length`` tokens (None: one row), no mask, or the
    ``rows`` given (lists of sequence indices, from ``micro_batch_rows``); else one right-padded row
    per sequence with an attention mask."""
    lengths = [len(sequence) for sequence in sequences]
    if not packing:
        bins = [[i] for i in range(len(sequences))]
    else:
        bins = first_fit_decreasing(lengths, pack_length) if rows is None else rows
    row_length = max((sum(lengths[i] for i in members) for members in bins), default=1)
    input_ids = torch.full((len(bins), row_length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(len(bins), row_length, dtype=torch.long)
    attention_mask = torch.zeros(len(bins), row_length, dtype=torch.long)
    predicting, destination, last_position = [], [], [0] * len(sequences)
    for row, members in enumerate(bins):
        offset = 0
        for i in members:
            length, answer = lengths[i], answer_lengths[i]
            input_ids[row, offset:offset + length] = sequences[i]
            position_ids[row, offset:offset + length] = torch.arange(length)
            attention_mask[row, offset:offset + length] = 1
            first = row * row_length + offset + length - answer - 1  # predicts answer token 0
            predicting.append(torch.arange(first, first + answer))
            destination.append(torch.arange(i * width, i * width + answer))
            last_position[i] = row * row_length + offset + length - 1
            offset += length
        if packing:  # the tail of pads: a block of its own (positions 0, 1, ...), seen by no real token
            position_ids[row, offset:] = torch.arange(row_length - offset)
    return PassLayout(input_ids=input_ids, position_ids=position_ids,
                      attention_mask=None if packing else attention_mask,
                      predicting=torch.cat(predicting) if predicting else torch.zeros(0, dtype=torch.long),
                      destination=torch.cat(destination) if destination else torch.zeros(0, dtype=torch.long),
                      last_position=torch.tensor(last_position, dtype=torch.long),
                      num_sequences=len(sequences), width=width, real_tokens=sum(lengths))


def micro_batch_layouts(sequences: list[torch.Tensor], answer_lengths: list[int], width: int, micro_batch_size: int,
                        micro_batch_tokens: int, packing: bool, pack_length: int | None, pad_token_id: int
                        ) -> list[tuple[list[int], PassLayout]]:
    """``sequences`` (as for pass_layout) in micro-batches (``micro_batch_rows``): per micro-batch the
    indices of its sequences, in the order of its layout's results, and that layout."""
    plan = []
    for micro_batch in micro_batch_rows([len(sequence) for sequence in sequences], micro_batch_size,
                                        micro_batch_tokens, packing, pack_length):
        members = [index for row in micro_batch for index in row]
        local_rows, start = [], 0
        for row in micro_batch:
            local_rows.append(list(range(start, start + len(row))))
            start += len(row)
        plan.append((members, pass_layout([sequences[i] for i in members], [answer_lengths[i] for i in members], width,
                                          pack_length, packing, pad_token_id, local_rows)))
    return plan


def to_device(tree, device: torch.device):
    """``tree`` (PassLayouts, tensors, and lists, tuples and dicts of them) with every tensor on
    ``device``, in one host-to-device copy per dtype: the tensors are packed into one pinned buffer
    each, copied with non_blocking (the host does not wait), and handed out as views. Once per step,
    so that the micro-batch loop makes no copy and no sync."""
    device = torch.device(device)
    leaves: list[torch.Tensor] = []

    def collect(node):
        if isinstance(node, torch.Tensor):
            leaves.append(node)
        elif isinstance(node, PassLayout):
            for field in fields(node):
                collect(getattr(node, field.name))
        elif isinstance(node, (list, tuple)):
            for item in node:
                collect(item)
        elif isinstance(node, dict):
            for item in node.values():
                collect(item)

    collect(tree)
    moved: dict[int, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for leaf in leaves:  # host tensors travel (on a CPU device too: one no-op .to per dtype, as on a GPU)
        if leaf.device.type == "cpu":
            by_dtype.setdefault(leaf.dtype, []).append(leaf)
        else:
            moved[id(leaf)] = leaf
    for dtype, group in by_dtype.items():
        flat = torch.cat([leaf.reshape(-1) for leaf in group])
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        for leaf, part in zip(group, flat.split([leaf.numel() for leaf in group])):
            moved[id(leaf)] = part.view(leaf.shape)

    def rebuild(node):
        if isinstance(node, torch.Tensor):
            return moved[id(node)]
        if isinstance(node, PassLayout):
            return replace(node, **{field.name: rebuild(getattr(node, field.name)) for field in fields(node)})
        if isinstance(node, list):
            return [rebuild(item) for item in node]
        if isinstance(node, tuple):
            return tuple(rebuild(item) for item in node)
        if isinstance(node, dict):
            return {key: rebuild(item) for key, item in node.items()}
        return node

    return rebuild(tree)


def _flash_attention_serves(model) -> bool:
    """True when the model runs a variable-length flash-attention kernel that can serve it: Gemma 2's
    attention soft-capping needs flash-attn >= 2.6."""
    if model.config._attn_implementation not in VARLEN_ATTENTIONS:
        return False
    softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None)
    if softcap is None or model.config._attn_implementation == "flash_attention_3":
        return True
    try:
        version = tuple(int(part) for part in metadata.version("flash_attn").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (2, 6)


def packing_plan(model, packing: bool, pack_length) -> tuple[bool, str | int | None, str]:
    """(packing, pack length, a line for the start-up) for the model's attention: PACK_LENGTH auto is
    the step's longest sequence ("auto", resolved per step by ``resolve_pack_length``), or None (one
    row per micro-batch) where a variable-length kernel serves the model. Packing falls back to
    padded rectangles for an attention the tests do not cover."""
    attention = model.config._attn_implementation
    if not packing:
        return False, None, "padded micro-batches (PACKING=false)"
    if _flash_attention_serves(model):
        length = None if pack_length == "auto" else pack_length
        return True, length, (f"packed micro-batches, {attention} variable-length attention: "
                              f"{'one row per micro-batch' if length is None else f'rows of up to {length} tokens'}")
    if attention not in PACKED_ATTENTIONS:
        return False, None, f"padded micro-batches ({attention} attention is not tested packed)"
    bound = "the step's longest sequence" if pack_length == "auto" else f"{pack_length} tokens"
    return True, pack_length, f"packed micro-batches, {attention} attention: rows of up to {bound}"


def resolve_pack_length(pack_length, longest: int) -> int | None:
    """The bound of the step's rows: ``longest`` for auto, None (one row) kept, a number as it is
    (a sequence longer than it gets a row of its own)."""
    return longest if pack_length == "auto" else pack_length
