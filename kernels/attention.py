"""STUB (to be replaced by the kernels issue): attention with the contract of ../shared/DESIGN.md."""
import torch
import torch.nn.functional as F


def attention_reference(q, k, v, doc_ids=None):
    """q (B, Hq, T, D), k/v (B, Hkv, Tk, D) -> (B, Hq, T, D). Causal (bottom-right when Tk > T), doc mask."""
    B, Hq, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    i = torch.arange(T, device=q.device)[:, None] + (Tk - T)
    j = torch.arange(Tk, device=q.device)[None, :]
    mask = (j <= i)[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    att = (q.float() @ k.float().transpose(-2, -1)) * D ** -0.5
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return (att @ v.float()).to(q.dtype)


def attention(q, k, v, doc_ids=None):
    return attention_reference(q, k, v, doc_ids)
