"""GPTQ (Frantar et al., 2022): INT4 with Hessian-based error compensation, in the packed group layout.

For a Linear W [N, K] with calibration inputs x (rows of X), the layer-wise objective is
    min_Q ||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T),   H = (2/n) sum_x x x^T  (K x K).
Columns are quantized one at a time in order (or by decreasing diag(H) with act_order); the rounding
error of column j, e_j = (w_j - q_j) / [H^-1]_jj, is spread over the columns not yet quantized via the
upper Cholesky factor U of H^-1 (w_{>j} -= e_j U_{j,>j}), in lazy blocks of 128 columns.
H is damped by 1% of its mean diagonal. Group parameters (scale, zero point) are computed from the
already-updated weights when the first column of a group is reached; with act_order they are computed
up front from the original weights ("static groups"), because the file's groups are consecutive in K.

Loop-aware: `add_batch` is called once per call of the Linear, so a shared middle-block weight
accumulates the inputs of all r loop iterations (n = r x calibration tokens).
"""
from __future__ import annotations

import torch

from edgeloop.quantize.config import QuantizeError
from edgeloop.quantize.packing import group_params, quantize_codes, rtn, dequantize, split_groups

DAMP = 0.01
BLOCK = 128


class GPTQ:
    """Accumulates H = (2/n) sum x x^T for inputs of width K, then quantizes weights against it."""

    def __init__(self, k: int, name: str = "", device: str | torch.device = "cpu"):
        self.k, self.name = k, name
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the rows of x [..., K] (every token of one call of the Linear) to the running average."""
        X = x.detach().reshape(-1, self.k).float().to(self.H.device)
        m = X.shape[0]
        if m == 0:
            return
        self.H.mul_(self.nsamples / (self.nsamples + m))
        self.nsamples += m
        X = X * (2.0 / self.nsamples) ** 0.5
        self.H.addmm_(X.t(), X)

    def _inverse_factor(self, H: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of (H + damp I)^-1, computed in float64; damping raised x10 on failure."""
        Hd = H.double()
        mean_diag = torch.diag(Hd).mean().item()
        eye = torch.eye(self.k, dtype=torch.float64, device=H.device)
        for attempt in range(4):
            damp = DAMP * 10 ** attempt * (mean_diag if mean_diag > 0 else 1.0)
            L, info = torch.linalg.cholesky_ex(Hd + damp * eye)
            if int(info) == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if int(info) == 0:
                    return U.float()
        raise QuantizeError(f"layer '{self.name}': the calibration Hessian is not positive definite "
                            f"even with damping (use more calibration samples)")

    @torch.no_grad()
    def fasterquant(self, weight: torch.Tensor, group_size: int, sym: bool, scale_dtype: str,
                    act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """W [N, K] -> (codes uint8 [N, K/G, G], scales [N, K/G], zero points [N, K/G], stats).
        stats: calibration-weighted output error tr(dW H dW^T) / tr(W H W^T) of GPTQ and of RTN."""
        if self.nsamples == 0:
            raise QuantizeError(f"layer '{self.name}': no calibration inputs reached it")
        W = weight.detach().float().to(self.H.device).clone()
        N, K = W.shape
        dev = W.device
        nb = K // group_size
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        scale = torch.empty(N, nb, dtype=torch.float16 if scale_dtype == "float16" else torch.float32, device=dev)
        zero = torch.empty(N, nb, device=dev)
        if act_order:
            scale, zero = group_params(split_groups(W, group_size), sym, scale_dtype)
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            W, H = W[:, perm], H[perm][:, perm]
        else:
            perm = torch.arange(K, device=dev)
        Hinv = self._inverse_factor(H)
        codes = torch.empty(N, K, dtype=torch.uint8, device=dev)
        bs = group_size * max(1, BLOCK // group_size)  # blocks hold whole groups
        for i1 in range(0, K, bs):
            i2 = min(i1 + bs, K)
            W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1, device=dev), Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = int(perm[i1 + i])
                g = col // group_size
                if not act_order and col % group_size == 0:
                    scale[:, g], zero[:, g] = group_params(W1[:, i:i + group_size], sym, scale_dtype)
                w, d = W1[:, i], Hinv1[i, i]
                q = quantize_codes(w, scale[:, g], zero[:, g])
                codes[:, col] = q
                err = (w - (q.float() - zero[:, g]) * scale[:, g].float()) / d
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        codes = codes.view(N, nb, group_size)
        stats = self.errors(weight, codes, scale, zero, group_size, sym, scale_dtype)
        return codes, scale, zero, stats

    def errors(self, weight, codes, scale, zero, group_size, sym, scale_dtype) -> dict:
        """Relative output error on the calibration inputs for these codes and for plain RTN."""
        W = weight.detach().float().to(self.H.device)
        ref = torch.einsum("nk,kl,nl->", W, self.H, W).clamp_min(1e-30)

        def rel(What: torch.Tensor) -> float:
            D = W - What
            return float(torch.einsum("nk,kl,nl->", D, self.H, D) / ref)

        mine = (codes.float() - zero.unsqueeze(-1)) * scale.float().unsqueeze(-1)
        qw, sc, qz = rtn(W, group_size, sym, scale_dtype)
        return {"gptq_err": rel(mine.reshape(W.shape)), "rtn_err": rel(dequantize(qw, sc, qz, group_size, sym)),
                "nsamples": self.nsamples}
