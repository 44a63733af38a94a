"""Keys k and target vectors z* for a batch of facts (docs/algorithms.md section 1).

One pass without grad, on the weights the method edits against (W0 for D4S), records the keys of
every edited layer and the last edited block's output h. z* = h + delta then minimises, per fact,
the objective of :func:`_objective`, with delta clamped after each step (:func:`_clamp_`). The
optimisation starts from the cached output: the blocks up to the last edited one never run again,
and the gradient flows only through the blocks above it, which editing never changes.

A batch of facts shrinks as it converges: once a fact's target NLL is below the threshold its
rows leave the batch, so a batch costs about the sum of its facts' own steps rather than its
slowest fact's steps times its size. How a step runs its rows fast (cached prefixes, groups of
similar width) is ``editing.zstar_steps``; neither changes the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.adapters import adapter_for
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel
from editing.tracing import Trace, instrument
from editing.zstar_batch import Batch, build_batch
from editing.zstar_steps import Step, prefix_cache, prefix_reusable, step_for


@dataclass
class ZStarResult:
    """Per fact: keys (layer -> n x in), residual R = z* - h (n x out), and diagnostics."""

    keys: dict[int, torch.Tensor]
    residual: torch.Tensor
    row_keys: torch.Tensor  # n x P x in: the first edited layer's key on each of a fact's P rows
    nll_before: list[float]
    nll_after: list[float]
    steps: int
    seconds: dict[str, float]  # keys: the first pass; zstar: the optimisation


def compute_zstar(
    lm: LoadedModel,
    facts: list[Fact],
    hp: EditHparams,
    weights: dict[int, torch.Tensor] | None = None,
    *,
    reuse_prefix: bool = True,
    group_overhead: float | None = None,
) -> ZStarResult:
    """Keys and residuals for ``facts``, optimised together.

    ``weights`` maps edited layers to the weights to edit against (``out x in``); layers not in
    it use the model's own. Deterministic for given inputs and ``hp.seed``. ``reuse_prefix=False``
    runs every step over the whole rows instead of caching their prefixes: the plain definition,
    slower, kept to check the fast path against. ``group_overhead``: how the fast path groups
    rows by width (:meth:`Step.of`; ``math.inf`` runs them in one padded group).
    """
    started = time.perf_counter()
    torch.manual_seed(hp.seed)
    instrument(lm.model, adapter_for(lm.model))
    batch = build_batch(lm.tokenizer, facts, hp.context_prefixes, lm.device)
    last = hp.last_layer
    trace = _first_pass(lm, batch, hp.layers, weights, capture_last=True)
    assert trace.block_output is not None
    cached = trace.block_output.detach().float()
    keys = {layer: _mean_keys(trace.inputs[layer], batch, len(facts)) for layer in hp.layers}
    row_keys = _row_keys(trace.inputs[hp.layers[0]], batch, len(facts))
    h = cached[batch.bare_rows, batch.lookup[batch.bare_rows]]  # n x hidden
    keyed = time.perf_counter()

    n = len(facts)
    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * h.norm(dim=1)  # n
    done = torch.zeros(n, dtype=torch.bool, device=lm.device)
    reuse_prefix = reuse_prefix and prefix_reusable(lm, batch)
    prefix = prefix_cache(lm, batch, cached, last) if reuse_prefix else None

    # The rows still optimised: rebuilt, smaller, whenever a fact converges.
    live, live_facts = batch, torch.arange(n, device=lm.device)
    all_rows = torch.arange(len(batch.input_ids), device=lm.device)
    step_input = step_for(lm, batch, all_rows, cached, prefix, group_overhead)

    head = lm.model.get_output_embeddings()
    kl_ref = torch.empty(0)
    nll_before: list[float] = []
    nll_last = torch.zeros(n, device=lm.device)
    steps = 0
    for step in range(hp.v_steps):
        if len(live_facts) > int((~done).sum()):
            live, rows = batch.select(~done)
            live_facts = (~done).nonzero()[:, 0]
            step_input = step_for(lm, live, rows, cached, prefix, group_overhead)
        nll, kl_logp = _predictions(lm, head, step_input, live, live_facts, delta, n, last)
        if step == 0:  # delta = 0 and every fact present: the unedited distribution
            kl_ref = kl_logp.detach()
            nll_before = nll.detach().cpu().tolist()
        nll_last[live_facts] = nll.detach()
        converged = nll.detach() < hp.v_loss_threshold
        done[live_facts] |= converged
        if bool(done.all()) or step == hp.v_steps - 1:
            break
        objective = _objective(
            nll, kl_logp, kl_ref[live_facts], delta[live_facts], h[live_facts], hp
        )
        # Summed over facts: each fact's delta only sees its own rows, so a batch optimises each
        # fact exactly as if it were alone.
        loss = objective[~converged].sum()
        optimizer.zero_grad()
        loss.backward()
        frozen = delta.detach().clone()
        optimizer.step()
        steps = step + 1
        with torch.no_grad():
            _clamp_(delta, max_norm)
            delta[done] = frozen[done]  # Adam's momentum would move them on

    return ZStarResult(
        keys={layer: k.float().cpu() for layer, k in keys.items()},
        residual=delta.detach().float().cpu(),
        row_keys=row_keys,
        nll_before=nll_before,
        nll_after=nll_last.cpu().tolist(),
        steps=steps,
        seconds={"keys": keyed - started, "zstar": time.perf_counter() - keyed},
    )


def _objective(
    nll: torch.Tensor,
    kl_logp: torch.Tensor,
    kl_ref: torch.Tensor,
    delta: torch.Tensor,
    h: torch.Tensor,
    hp: EditHparams,
) -> torch.Tensor:
    """What z* minimises, per fact (n):

        NLL(target) + kl_factor * KL(p_ref || p) + v_weight_decay * |delta|^2 / |h|^2

    nll: the target's mean per-token NLL over the fact's prompts (n). kl_logp, kl_ref: the
    next-token log-probabilities after "{subject} is a" (the essence prompt), edited and unedited
    (n x V): the KL term keeps what the model says the subject is. delta, h: the shift and the
    unedited output at the subject (n x hidden).
    """
    kl = (kl_ref.exp() * (kl_ref - kl_logp)).sum(dim=-1)
    decay = hp.v_weight_decay * delta.pow(2).sum(dim=1) / h.pow(2).sum(dim=1)
    return nll + hp.kl_factor * kl + decay


def _clamp_(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale each fact's delta (n x hidden, in place) back to at most ``max_norm`` (n):
    clamp_norm_factor * |h|, so that z* stays near the activations the model makes."""
    norms = delta.norm(dim=1).clamp_min(1e-12)
    scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
    delta.mul_(scale[:, None])


def _predictions(
    lm: LoadedModel,
    head: torch.nn.Module,
    step_input: Step,
    live: Batch,
    live_facts: torch.Tensor,
    delta: torch.Tensor,
    n: int,
    last: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The live facts' target NLL (``live_facts``: their numbers among the ``n``) and their
    next-token log-probabilities after "{subject} is a" (facts x V), with ``delta`` (n x hidden)
    added to the output of block ``last`` at each row's subject."""
    hidden = step_input.run(lm, last, delta[live.fact_of_row])
    # The vocabulary projection only where a loss reads it (not at the padding of short
    # targets): a large share of the step's cost.
    target_logits = head(hidden[step_input.target_index[live.target_mask]]).float()
    nll = _target_nll(target_logits, live, n)[live_facts]
    kl_logp = F.log_softmax(head(hidden[step_input.kl_index]).float(), dim=-1)
    return nll, kl_logp


def compute_keys(
    lm: LoadedModel, facts: list[Fact], hp: EditHparams, layers: tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """The keys of ``facts`` at ``layers`` (layer -> n x in), as :func:`compute_zstar` records
    them, on the model's own weights: no z*. Extends records to more layers below the last
    edited one, whose z* (computed at the last layer alone) is unchanged by them."""
    trace, batch = _keys_pass(lm, facts, hp, layers)
    return {
        layer: _mean_keys(trace.inputs[layer], batch, len(facts)).float().cpu() for layer in layers
    }


def compute_row_keys(lm: LoadedModel, facts: list[Fact], hp: EditHparams) -> torch.Tensor:
    """The keyed memory's keys of ``facts`` (``n x P x in``) as :func:`compute_zstar` records them
    in ``row_keys``, for records written before they were: no z*. The first edited layer's input
    comes before any edited matrix, so the model's own weights give W0's keys."""
    trace, batch = _keys_pass(lm, facts, hp, hp.layers[:1])
    return _row_keys(trace.inputs[hp.layers[0]], batch, len(facts))


def _keys_pass(
    lm: LoadedModel, facts: list[Fact], hp: EditHparams, layers: tuple[int, ...]
) -> tuple[Trace, Batch]:
    """:func:`_first_pass` over ``facts``' rows on the model's own weights, without z*."""
    instrument(lm.model, adapter_for(lm.model))
    batch = build_batch(lm.tokenizer, facts, hp.context_prefixes, lm.device)
    return _first_pass(lm, batch, layers, None, capture_last=False), batch


def _first_pass(
    lm: LoadedModel,
    batch: Batch,
    layers: tuple[int, ...],
    weights: dict[int, torch.Tensor] | None,
    capture_last: bool,
) -> Trace:
    """One pass without grad up to the highest of ``layers``, recording the edited matrices'
    inputs at ``layers`` and (``capture_last``) that block's output; ``weights`` replaces those
    layers' weights."""
    last = max(layers)
    trace = Trace(
        capture_inputs=frozenset(layers),
        weights=dict(weights or {}),
        capture_block=last if capture_last else None,
        stop_after=last,
    )
    with torch.no_grad(), trace:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return trace


def _mean_keys(inputs: torch.Tensor, batch: Batch, n: int) -> torch.Tensor:
    """Average the edited matrix's input at the subject's last token over each fact's prompts."""
    per_row = _at_subject(inputs, batch).float()  # R x in
    return _mean_per_fact(per_row, batch.fact_of_row[batch.nll_rows], n)


def _row_keys(inputs: torch.Tensor, batch: Batch, n: int) -> torch.Tensor:
    """The edited matrix's input at the subject's last token on each of a fact's rows, unaveraged
    (``n x P x in``, float16 on the CPU, P the context prefixes): the keyed memory's entries
    (``editing.keyed_memory``). The rows of a fact are consecutive, in prefix order."""
    per_row = _at_subject(inputs, batch)
    return per_row.reshape(n, len(per_row) // n, -1).to(torch.float16).cpu()


def _at_subject(inputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``inputs`` (B x T x in) at the subject's last token of each prompt row: R x in."""
    rows = batch.nll_rows
    return inputs[rows, batch.lookup[rows]]


def _target_nll(logits: torch.Tensor, batch: Batch, n: int) -> torch.Tensor:
    """Mean per-token NLL of the target for each fact, averaged over its prompts: n.

    logits: T x V at the positions that predict a target token, row by row (``target_mask``'s
    set entries, in order).
    """
    mask = batch.target_mask
    chosen = logits.gather(-1, batch.target_ids[mask][:, None])[:, 0]
    nll = torch.logsumexp(logits, dim=-1) - chosen  # T
    # Back into the rows' shape and summed along them: no atomic adds, so a GPU gives the same
    # bits on every run (replicas computing z* must agree).
    dense = torch.zeros(mask.shape, device=nll.device, dtype=nll.dtype).masked_scatter(mask, nll)
    per_row = dense.sum(dim=1) / mask.sum(dim=1)
    return _mean_per_fact(per_row, batch.fact_of_row[batch.nll_rows], n)


def _mean_per_fact(per_row: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Average the rows (R x ...) of each of ``n`` facts; ``owner`` (R) names each row's fact.

    A product with the rows' one-hot owners rather than an ``index_add``, whose atomic adds on a
    GPU sum in a varying order; out of place, so that gradients flow through it.
    """
    onehot = F.one_hot(owner, n).to(per_row.dtype)  # R x n
    sums = onehot.T @ per_row.reshape(len(per_row), -1)
    counts = onehot.sum(dim=0).clamp_min(1)
    return (sums / counts[:, None]).reshape(n, *per_row.shape[1:])
