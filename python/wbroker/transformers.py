"""transformers and sentence-transformers models over the broker's tensors.

  from wbroker.transformers import from_pretrained
  model = from_pretrained("org/name", revision="3f6b9d2")     # AutoModelForCausalLM
  model.generate(...)                                          # as from_pretrained's model

The model is built from its config with every parameter on the meta device
(nothing allocated, nothing initialised); buffers that are not in the
checkpoint (rotary inv_freq, position ids) are computed as usual. Then each
parameter is bound to the broker's tensor of the same name, without a copy;
tied weights are tied again. The lease lives as long as the model does.
"""
import contextlib
import logging
import os
import warnings

import torch
from torch import nn

from .client import connect
from .dtypes import torch_dtype as _torch_dtype

log = logging.getLogger("wbroker")


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside is moved to the meta device at once,
    so constructors allocate only empty tensors and init runs on nothing
    (what accelerate's init_empty_weights(include_buffers=False) does)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _checkpoint_dtype(lease):
    """The floating dtype most of the checkpoint's bytes are in."""
    by_dtype = {}
    for info in lease.manifest.values():
        dt = _torch_dtype(info.dtype)
        if dt is not None and dt.is_floating_point:
            by_dtype[dt] = by_dtype.get(dt, 0) + info.nbytes
    return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32


def _candidates(name, prefix):
    yield name
    if prefix:
        if name.startswith(prefix + "."):
            yield name[len(prefix) + 1:]
        else:
            yield f"{prefix}.{name}"


def bind_lease(model, lease, device=None):
    """Points every parameter and checkpoint buffer of `model` at the lease's
    tensors. Returns the number of bytes that had to be copied (dtype
    mismatches); zero in the normal case."""
    prefix = getattr(model, "base_model_prefix", "")
    tensors = lease.tensors
    copied = 0
    dev = torch.device(device or lease.device)

    def source(name, like):
        nonlocal copied
        for key in _candidates(name, prefix):
            if key in tensors:
                t = tensors[key]
                if tuple(t.shape) != tuple(like.shape):
                    raise ValueError(f"{lease.model}: checkpoint tensor {key} has shape {tuple(t.shape)}, "
                                     f"the model wants {tuple(like.shape)} for {name}")
                if t.dtype != like.dtype or t.device != dev:
                    copied += t.numel() * like.element_size()
                    t = t.to(device=dev, dtype=like.dtype)
                return t
        return None

    for mod_name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            t = source(full, param)
            if t is not None:
                module._parameters[pname] = nn.Parameter(t, requires_grad=False)
        for bname, buf in list(module._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{bname}" if mod_name else bname
            t = source(full, buf) if bname not in module._non_persistent_buffers_set else None
            if t is not None:
                module._buffers[bname] = t
            elif buf.device.type == "meta":
                raise ValueError(f"{lease.model}: buffer {full} is neither in the checkpoint nor computed")
            elif buf.device != dev:
                module._buffers[bname] = buf.to(dev)
    # Tied weights (lm_head = embed_tokens) are absent from the checkpoint.
    if any(p.device.type == "meta" for p in model.parameters()):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{lease.model}@{lease.revision}: the checkpoint lacks {len(missing)} "
                         f"parameter(s) the model needs: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")
    if copied:
        warnings.warn(f"wbroker: {copied} bytes of {lease.model} were copied to match the model's "
                      f"dtype/device; ask the broker for that dtype (dtype=...) to share them instead",
                      stacklevel=3)
    return copied


def _lease_for(model_id, revision, client, socket, device, dtype):
    own = client is None
    client = client or connect(socket)
    try:
        lease = client.attach(model_id, revision=revision, device=device, dtype=dtype)
    except BaseException:
        if own:
            client.close()
        raise
    return client, lease, own


def _resolve_dtype(kwargs):
    dtype = kwargs.pop("dtype", None)
    legacy = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else legacy
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    return None if dtype == "auto" else dtype


def build_model(lease, auto_class, dtype=None, device=None, **kwargs):
    """A transformers model of `auto_class` whose weights are the lease's tensors."""
    from transformers import AutoConfig, GenerationConfig
    kwargs.pop("local_files_only", None)
    kwargs.pop("revision", None)
    config = AutoConfig.from_pretrained(os.fspath(lease.snapshot), local_files_only=True, **kwargs)
    dtype = dtype or _checkpoint_dtype(lease)
    with _parameters_on_meta():
        model = auto_class.from_config(config, dtype=dtype)
    bind_lease(model, lease, device)
    model.eval()
    model.requires_grad_(False)
    if getattr(model, "can_generate", lambda: False)() and (lease.snapshot / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(os.fspath(lease.snapshot),
                                                                    local_files_only=True)
    model.wbroker_lease = lease  # the mapping lives as long as the model
    return model


def from_pretrained(model_id, revision=None, *, auto_class=None, client=None, socket=None, device=None,
                    **kwargs):
    """Like `AutoModelForCausalLM.from_pretrained(model_id, revision=revision,
    local_files_only=True)`, with the weights the broker holds.

    `dtype`/`torch_dtype`: None or "auto" uses the checkpoint's; another dtype
    is requested from the broker as a cast, so it is shared too. `auto_class`
    picks e.g. transformers.AutoModel. `client`: an open wbroker.Client (else
    one is made for `socket`). Extra kwargs go to AutoConfig.
    """
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    dtype = _resolve_dtype(kwargs)
    client, lease, own = _lease_for(model_id, revision, client, socket, device, dtype)
    try:
        model = build_model(lease, auto_class, dtype=dtype, **kwargs)
    except BaseException:
        lease.release()
        if own:
            client.close()
        raise
    if own:
        model.wbroker_client = client  # keeps the connection (and lease) open
    return model


def auto_model(model_id, revision=None, **kwargs):
    """AutoModel (encoders, base models) over the broker's tensors."""
    from transformers import AutoModel
    return from_pretrained(model_id, revision, auto_class=AutoModel, **kwargs)


def sentence_transformer(model_id, revision=None, *, client=None, socket=None, device=None, dtype=None,
                         **kwargs):
    """A sentence_transformers.SentenceTransformer whose transformer weights
    are the broker's tensors (pooling/normalize modules as the model says)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import transformer as st_transformer

    dtype = None if dtype == "auto" else dtype
    client, lease, own = _lease_for(model_id, revision, client, socket, device, dtype)
    snapshot = os.fspath(lease.snapshot)
    original = st_transformer.Transformer._load_model

    def load_model(self, model_name_or_path, transformer_task, config, backend, is_peft_model,
                   **model_kwargs):
        # Only the broker's model is built here; any other path loads as usual.
        if os.path.realpath(model_name_or_path) != os.path.realpath(snapshot) or backend != "torch":
            return original(self, model_name_or_path, transformer_task, config, backend, is_peft_model,
                            **model_kwargs)
        auto_class = st_transformer.TRANSFORMER_TASK_TO_AUTO_MODEL[transformer_task]
        with _parameters_on_meta():
            model = auto_class.from_config(config, dtype=dtype or _checkpoint_dtype(lease))
        bind_lease(model, lease, device)
        model.eval()
        return model

    st_transformer.Transformer._load_model = load_model
    try:
        st = SentenceTransformer(snapshot, device=device or lease.device, local_files_only=True, **kwargs)
    except BaseException:
        lease.release()
        if own:
            client.close()
        raise
    finally:
        st_transformer.Transformer._load_model = original
    st.requires_grad_(False)
    st.wbroker_lease = lease
    if own:
        st.wbroker_client = client
    return st
