"""What POPO's FSDP and Megatron engines share: where the pooled states come from, the pooled-only forward, the
predictor's settings and the per-optimizer-step hooks (the siamese's EMA, the head's gradient norm metric), and the
interface of the siamese that each engine implements (`Siamese`).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from verl.utils import tensordict_utils as tu

from popo_verl.config import PopoConfig
from popo_verl.protocol import POOLED_ONLY_KEY


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter or optimizer state."""
    return t.to_local() if isinstance(t, DTensor) else t


def response_states(values: torch.Tensor, data, width: int | None = None) -> torch.Tensor:
    """The packed states (nnz, H) at each row's response tokens -> (B, R, H), zero-padded (R = `width`, the longest
    response, when the caller knows it: reading it from the lengths is a device sync).

    Row b holds its prompt then its r_b response tokens (EOS included), rows back to back: the response
    states are the row's last r_b. The window of the reference's pooling (first response token through EOS);
    verl's `no_padding_2_padding` (verl/workers/utils/padding.py), which this mirrors for the lengths, takes
    the window one token earlier: the states that *predict* the response tokens, what log-probs need.
    """
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        prompt_lens, response_lens = prompts.offsets().diff(), responses.offsets().diff()
    else:
        attention = data["attention_mask"]
        prompt_lens = attention[:, : prompts.shape[1]].sum(dim=1)
        response_lens = attention[:, prompts.shape[1]:].sum(dim=1)
    ends = (prompt_lens + response_lens).cumsum(dim=0).to(values.device)
    response_lens = response_lens.to(values.device)
    torch._assert_async(ends[-1] == values.shape[0], "POPO pooling: the packed states and the rows' tokens differ in number")
    width = int(response_lens.max()) if width is None else width
    offs = torch.arange(width, device=values.device).unsqueeze(0)
    valid = offs < response_lens.unsqueeze(1)
    index = torch.where(valid, (ends - response_lens).unsqueeze(1) + offs, torch.zeros_like(offs))
    return values[index] * valid.unsqueeze(-1).to(values.dtype)


def pooled_only(micro_batch) -> bool:
    """A forward that returns the pooled states alone (the siamese under anchor=cosine): no LM-head log-probs."""
    return bool(tu.get_non_tensor_data(data=micro_batch, key=POOLED_ONLY_KEY, default=False))


class PopoEngineBase:
    """What POPO's FSDP and Megatron engines share: the predictor settings, and after each optimizer step the
    siamese EMA callback and the head's gradient norm metric."""

    #: POPO's settings (the predictor's size and clip); set by configure_popo before the model is built
    popo_config: PopoConfig = PopoConfig()
    #: the predictor head's initialisation seed (the same on every rank)
    popo_predictor_seed: int = 0

    def configure_popo(self, config: PopoConfig, seed: int = 0) -> None:
        self.popo_config, self.popo_predictor_seed = config, int(seed)

    @property
    def popo_predictor_hidden(self) -> int:
        return self.popo_config.predictor_hidden_dim

    @property
    def popo_predictor_layers(self) -> int:
        return self.popo_config.predictor_layers

    @property
    def popo_predictor_clip_grad(self) -> float:
        """The predictor head's own max grad norm (0 = no clip)."""
        return self.popo_config.predictor_clip_grad

    #: called as fn(grad_norm) after every optimizer step that updated the weights (the siamese EMA)
    popo_after_optimizer_step = None
    #: the head's gradient norm at the last optimizer step (before its clip), for popo/predictor_grad_norm
    popo_predictor_grad_norm: float | None = None

    def _after_step(self, grad_norm):
        callback = self.popo_after_optimizer_step
        if callback is not None and grad_norm is not None:
            gn = float(grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm)
            if gn == gn and gn not in (float("inf"), float("-inf")):  # verl skips non-finite steps
                callback(gn)
        return grad_norm

    def train_batch(self, data, loss_function):
        self.popo_predictor_grad_norm = None
        outputs = super().train_batch(data, loss_function)
        if self.popo_predictor_grad_norm is not None and self.is_mp_src_rank_with_outputs():
            from verl.utils.metric import AggregationType, Metric

            # the norm is global (same on every rank); verl averages Metrics over ranks, then over mini-batches
            outputs["metrics"]["popo/predictor_grad_norm"] = Metric(AggregationType.MEAN, self.popo_predictor_grad_norm)
        return outputs




class Siamese:
    """The siamese network xi: an fp32 EMA of the actor's weights theta, held in verl's ref role next to the actor
    (same ranks, same sharding), one implementation per engine (`engines.fsdp.FsdpSiamese`,
    `engines.megatron.MegatronSiamese`). Every method works on this rank's shards; the caller sums over ranks."""

    #: the device of the actor's weights, where the EMA's and the drift's work runs
    device: torch.device
    #: whether every rank must join the update-direction reduction even with no optimizer state of its own
    #: (a Megatron distributed-optimizer rank may hold no shard)
    every_rank_reduces: bool = False

    def check_layout(self) -> None:
        """Raise if the siamese and the actor do not hold the same parameters, shard for shard, in fp32."""
        raise NotImplementedError

    def copy_from_actor(self) -> None:
        """xi <- theta."""
        raise NotImplementedError

    def ema(self, tau: float) -> None:
        """xi <- tau * xi + (1 - tau) * theta (`core.ema_update_`)."""
        raise NotImplementedError

    def distance_sq(self) -> torch.Tensor:
        """This rank's share of ||theta - xi||^2, a float64 device scalar (each weight counted once over all ranks)."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's siamese shards on the host, for the checkpoint."""
        raise NotImplementedError

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of `state`."""
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers that step theta (their Adam moments give the update direction of Lemma 3.2)."""
        raise NotImplementedError

    def predictor_param_ids(self) -> set[int]:
        """ids of the optimizer parameters that are the predictor head's (no siamese counterpart)."""
        raise NotImplementedError

    def named_actor_params(self) -> list[tuple[str, torch.Tensor]]:
        """The actor's parameters by name, the predictor head's included (for `popo_full_state`)."""
        raise NotImplementedError

    def named_siamese_params(self) -> list[tuple[str, torch.Tensor]]:
        """The siamese's parameters by name (for `popo_full_state`)."""
        raise NotImplementedError
