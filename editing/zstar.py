"""Keys k and target vectors z* for a batch of facts (ALGORITHMS.md section 1).

One pass without grad, on the weights the method edits against (W0 for D4S), records the keys of
every edited layer and the last edited block's output. The optimisation of the residual delta
then starts from that cached output: the blocks up to the last edited one never run again, and
the gradient flows only through the blocks above it, which editing never changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from editing.adapters import adapter_for
from editing.facts import Fact, subject_last_token
from editing.hparams import EditHparams
from editing.models import LoadedModel, right_padded
from editing.tracing import Trace, instrument


@dataclass
class ZStarResult:
    """Per fact: keys (layer -> n x in), residual R = z* - h (n x out), and diagnostics."""

    keys: dict[int, torch.Tensor]
    residual: torch.Tensor
    nll_before: list[float]
    nll_after: list[float]
    steps: int
    seconds: dict[str, float]  # keys: the first pass; zstar: the optimisation


@dataclass
class _Batch:
    input_ids: torch.Tensor  # B x T, right-padded
    attention_mask: torch.Tensor  # B x T
    fact_of_row: torch.Tensor  # B: which fact each row belongs to
    lookup: torch.Tensor  # B: index of the subject's last token in each row
    nll_rows: torch.Tensor  # R: rows of "prefix + prompt + target"
    target_pos: torch.Tensor  # R x Tt: positions whose logits predict the target tokens
    target_ids: torch.Tensor  # R x Tt
    target_mask: torch.Tensor  # R x Tt
    bare_rows: torch.Tensor  # n: the row of each fact's bare prompt (no prefix)
    kl_rows: torch.Tensor  # n: rows of "{subject} is a"
    kl_last: torch.Tensor  # n: last position of those rows


def compute_zstar(
    lm: LoadedModel,
    facts: list[Fact],
    hp: EditHparams,
    weights: dict[int, torch.Tensor] | None = None,
) -> ZStarResult:
    """Keys and residuals for ``facts``, optimised together.

    ``weights`` maps edited layers to the weights to edit against (``out x in``); layers not in
    it use the model's own. Deterministic for given inputs and ``hp.seed``.
    """
    started = time.perf_counter()
    torch.manual_seed(hp.seed)
    instrument(lm.model, adapter_for(lm.model))
    batch = _build_batch(lm.tokenizer, facts, hp.context_prefixes, lm.device)
    last = hp.last_layer
    trace = Trace(
        capture_inputs=frozenset(hp.layers),
        weights=dict(weights or {}),
        capture_block=last,
        stop_after=last,
    )
    with torch.no_grad(), trace:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    assert trace.block_output is not None
    cached = trace.block_output.detach().float()
    keys = {layer: _mean_keys(trace.inputs[layer], batch, len(facts)) for layer in hp.layers}
    rows_all = torch.arange(len(batch.input_ids), device=lm.device)
    h = cached[batch.bare_rows, batch.lookup[batch.bare_rows]]  # n x hidden
    keyed = time.perf_counter()

    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * h.norm(dim=1)  # n
    done = torch.zeros(len(facts), dtype=torch.bool, device=lm.device)
    model_dtype = lm.dtype

    def injected() -> torch.Tensor:
        shift = delta[batch.fact_of_row].to(model_dtype)
        return cached.to(model_dtype).index_put((rows_all, batch.lookup), shift, accumulate=True)

    base, head = lm.model.base_model, lm.model.get_output_embeddings()
    kl_ref: torch.Tensor | None = None
    nll_before: list[float] = []
    nll = torch.zeros(len(facts))
    steps = 0
    for step in range(hp.v_steps):
        with Trace(start_after=last, replace_output=injected):
            hidden = base(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
        # The vocabulary projection only where a loss reads it: a large share of the step's cost.
        target_logits = head(hidden[batch.nll_rows[:, None], batch.target_pos]).float()
        nll = _target_nll(target_logits, batch, len(facts))
        kl_logp = F.log_softmax(head(hidden[batch.kl_rows, batch.kl_last]).float(), dim=-1)
        if kl_ref is None:  # the first pass has delta = 0: the unedited distribution
            kl_ref = kl_logp.detach()
            nll_before = nll.detach().cpu().tolist()
        done = done | (nll.detach() < hp.v_loss_threshold)
        if bool(done.all()) or step == hp.v_steps - 1:
            break
        kl = (kl_ref.exp() * (kl_ref - kl_logp)).sum(dim=-1)  # n
        decay = hp.v_weight_decay * delta.pow(2).sum(dim=1) / h.pow(2).sum(dim=1)
        # Summed over facts: each fact's delta only sees its own rows, so a batch optimises each
        # fact exactly as if it were alone.
        loss = (nll + hp.kl_factor * kl + decay)[~done].sum()
        optimizer.zero_grad()
        loss.backward()
        frozen = delta.detach().clone()
        optimizer.step()
        steps = step + 1
        with torch.no_grad():
            norms = delta.norm(dim=1).clamp_min(1e-12)
            scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
            delta.mul_(scale[:, None])
            delta[done] = frozen[done]

    return ZStarResult(
        keys={layer: k.float().cpu() for layer, k in keys.items()},
        residual=delta.detach().float().cpu(),
        nll_before=nll_before,
        nll_after=nll.detach().cpu().tolist(),
        steps=steps,
        seconds={"keys": keyed - started, "zstar": time.perf_counter() - keyed},
    )


def _mean_keys(inputs: torch.Tensor, batch: _Batch, n: int) -> torch.Tensor:
    """Average the edited matrix's input at the subject's last token over each fact's prompts."""
    rows = batch.nll_rows
    per_row = inputs[rows, batch.lookup[rows]].float()  # R x in
    return _mean_per_fact(per_row, batch.fact_of_row[rows], n)


def _target_nll(logits: torch.Tensor, batch: _Batch, n: int) -> torch.Tensor:
    """Mean per-token NLL of the target for each fact, averaged over its prompts: n.

    logits: R x Tt x V at the positions that predict each target token.
    """
    logp = F.log_softmax(logits, dim=-1).gather(-1, batch.target_ids[..., None])[..., 0]
    mask = batch.target_mask.float()
    per_row = -(logp * mask).sum(dim=1) / mask.sum(dim=1)
    return _mean_per_fact(per_row, batch.fact_of_row[batch.nll_rows], n)


def _mean_per_fact(per_row: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Average the rows (R x ...) of each of ``n`` facts; ``owner`` (R) names each row's fact.

    Out of place, so that gradients flow through it.
    """
    sums = torch.zeros(n, *per_row.shape[1:], device=per_row.device, dtype=per_row.dtype)
    sums = sums.index_add(0, owner, per_row)
    counts = torch.bincount(owner, minlength=n).clamp_min(1).to(per_row.dtype)
    return sums / counts.view(n, *([1] * (per_row.dim() - 1)))


def _build_batch(
    tok: PreTrainedTokenizerBase,
    facts: list[Fact],
    prefixes: tuple[str, ...],
    device: torch.device,
) -> _Batch:
    rows: list[list[int]] = []
    fact_of_row: list[int] = []
    lookup: list[int] = []
    nll_rows: list[int] = []
    targets: list[tuple[list[int], list[int]]] = []  # (positions, ids) per nll row
    bare_rows: list[int] = []
    kl_rows: list[int] = []
    kl_last: list[int] = []
    for index, fact in enumerate(facts):
        target = tok(fact.target_text(fact.target_new), add_special_tokens=False)["input_ids"]
        for prefix in prefixes:
            ids, last = subject_last_token(tok, prefix + fact.prompt, fact.subject, len(prefix))
            if prefix == "":
                bare_rows.append(len(rows))
            nll_rows.append(len(rows))
            targets.append(([len(ids) - 1 + j for j in range(len(target))], target))
            rows.append(ids + target[:-1])
            fact_of_row.append(index)
            lookup.append(last)
        ids, last = subject_last_token(tok, f"{fact.subject} is a", fact.subject)
        kl_rows.append(len(rows))
        kl_last.append(len(ids) - 1)
        rows.append(ids)
        fact_of_row.append(index)
        lookup.append(last)

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids, attention = right_padded(rows, pad)
    t_width = max(len(ids) for _, ids in targets)
    target_pos = torch.zeros((len(targets), t_width), dtype=torch.long)
    target_ids = torch.zeros((len(targets), t_width), dtype=torch.long)
    target_mask = torch.zeros((len(targets), t_width), dtype=torch.bool)
    for i, (pos, ids) in enumerate(targets):
        target_pos[i, : len(pos)] = torch.tensor(pos)
        target_ids[i, : len(ids)] = torch.tensor(ids)
        target_mask[i, : len(ids)] = True

    def on(x: torch.Tensor | list[int]) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.long).to(device)

    return _Batch(
        input_ids=on(input_ids),
        attention_mask=on(attention),
        fact_of_row=on(fact_of_row),
        lookup=on(lookup),
        nll_rows=on(nll_rows),
        target_pos=on(target_pos),
        target_ids=on(target_ids),
        target_mask=target_mask.to(device),
        bare_rows=on(bare_rows),
        kl_rows=on(kl_rows),
        kl_last=on(kl_last),
    )
