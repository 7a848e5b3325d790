"""The Hugging Face format: a model folder that transformers loads, and back.

    tensors = read_safetensors("hf/demo/model.safetensors")     # {name: tensor}
    write_safetensors(path, tensors, metadata={"format": "pt"})
    checkpoint = read_hf_folder("downloads/gpt2")               # what train.py's init_from=hf: loads
    write_hf_folder(Path("hf/demo"), checkpoint, encoder, model_card)  # what export.py writes
    encoder = read_tokenizer_json("hf/demo")                    # a tiktoken.Encoding again

Each of our blocks has a transformers architecture that computes exactly what it does:
the gpt2 block is GPT2LMHeadModel, the modern block (without value embeddings, which no
transformers architecture has) is NanoChatForCausalLM (transformers 5.0 and later).

export.py writes, train.py (init_from=hf:PATH), sample.py and chat.py (--out_dir=hf:PATH) read, with
no dependency beyond torch and tiktoken: the few formats involved are written out here.

- model.safetensors: an 8-byte little-endian length, a JSON header giving each tensor's
  dtype, shape and byte range (data_offsets), then the raw little-endian tensor bytes.
- GPT-2's names are ours (nanoGPT copied them), but its c_attn, c_proj and c_fc are Conv1D
  layers, which store the weight as (in, out), the transpose of nn.Linear's (out, in). It
  always has biases (our bias=False exports zero ones: the same function), its vocabulary is
  not padded, and its head is the token embedding (tied), stored once.
- NanoChat splits our c_attn into q/k/v_proj and names the rest o_proj, fc1, fc2,
  embed_tokens; its rotary turns each pair of channels the other way (its rotate_half is
  cat(x2, -x1)), so each head's query and key rows go with their halves swapped, which
  leaves every attention score as it was.
- tokenizer.json: the tokenizers library's byte-level BPE. tiktoken keeps only ranks (merge
  order); the merges are rebuilt from them, and token bytes are spelt with GPT-2's
  byte-to-character table.
- tokenizer_config.json: for a model fine-tuned on conversations, owngpt/chat.py's chat
  template; generation_config.json then ends an answer at <|end|>, as chat.py does.
"""
import json
import re
import struct
import sys
from pathlib import Path

import tiktoken
import torch

from model import GPT, GPTConfig, padded_vocab_size
from owngpt.chat import CHAT_TEMPLATE, END, ESCAPE
from owngpt.dataset import EOT, atomic_write
from owngpt.flags import UserError

HF_PREFIX = "hf:"  # init_from=hf:PATH, --out_dir=hf:PATH
CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# tiktoken's r50k (GPT-2) split pattern: what a tokenizer.json with a regex-ing ByteLevel means
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class HFError(UserError):
    """A Hugging Face folder that cannot be read or written as GPT-2: one line, no traceback."""


# ----------------------------------------------------------------------------- safetensors
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, tensors, metadata=None):
    """tensors {name: tensor} in the safetensors format, atomically. torch's memory order is
    the machine's, little-endian on every platform it supports, so the bytes go as they are."""
    header, offset, blobs = {}, 0, []
    for name, tensor in tensors.items():
        blob = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the convention: tensor data starts 8-byte aligned

    def write(file):
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for blob in blobs:
            file.write(blob)
    atomic_write(Path(path), write)


def read_safetensors(path):
    """{name: tensor} from a safetensors file; HFError naming the file when it is not one."""
    data = bytearray(Path(path).read_bytes())
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if not 2 <= length <= len(data) - 8:
            raise ValueError(f"its header length {length} does not fit in its {len(data)} bytes")
        header = json.loads(data[8:8 + length])
        header.pop("__metadata__", None)
        body, tensors = 8 + length, {}
        for name, entry in header.items():
            dtype, shape, (start, end) = TORCH_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            count = 1
            for size in shape:
                count *= size
            if not 0 <= start <= end <= len(data) - body or end - start != count * dtype.itemsize:
                raise ValueError(f"{name}: bytes {start}..{end} do not hold {entry['dtype']} {shape}")
            tensors[name] = torch.frombuffer(data, dtype=dtype, count=count, offset=body + start).reshape(shape) \
                if count else torch.empty(shape, dtype=dtype)
    except (ValueError, KeyError, TypeError, struct.error) as error:
        raise HFError(f"{path} is not a readable safetensors file: {type(error).__name__}: {error}") from None
    return tensors


# ----------------------------------------------------------------------------- GPT-2 weights
def gpt2_names(n_layer):
    """Every tensor of GPT2LMHeadModel but the tied head, by the name it has there (and here)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for layer in range(n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{layer}.{part}.weight", f"transformer.h.{layer}.{part}.bias"]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def is_conv1d_weight(name):
    return name.endswith(".weight") and name.removesuffix(".weight").endswith(CONV1D_LAYERS)


def unexportable(model_config):
    """What about a model config no transformers architecture computes exactly: [] when nothing."""
    if model_config.get("value_embeddings"):
        return ["value_embeddings=True (a table per layer added to the attention values): no transformers "
                "architecture has them, and leaving them out would give other answers; train with "
                "value_embeddings=False to export"]
    return []


def gpt2_to_hf(state_dict, model_config):
    """Our gpt2-block state dict as GPT2LMHeadModel's tensors: Conv1D weights transposed,
    zero biases where we have none, the padding rows cut, the head left to the tie."""
    hf_tensors = {}
    for name in gpt2_names(model_config["n_layer"]):
        if name in state_dict:
            tensor = state_dict[name]
        else:  # bias=False: a zero bias computes the same function
            weight = state_dict[name.removesuffix(".bias") + ".weight"]
            tensor = torch.zeros(weight.shape[0], dtype=weight.dtype)
        if is_conv1d_weight(name):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            tensor = tensor[:model_config["vocab_size"]]
        hf_tensors[name] = tensor.contiguous()
    return hf_tensors


def gpt2_from_hf(hf_tensors, model_config, folder):
    """GPT2LMHeadModel's tensors (with or without the "transformer." prefix, as OpenAI's
    files have it) as our state dict, checked against the shapes our GPT expects."""
    tensors = {name.removeprefix("transformer."): tensor for name, tensor in hf_tensors.items()}
    with torch.device("meta"):  # shapes only, no memory
        expected = GPT(GPTConfig(**model_config)).state_dict()
    state_dict = {}
    for name in gpt2_names(model_config["n_layer"]):
        tensor = tensors.get(name.removeprefix("transformer."))
        if tensor is None:
            raise HFError(f"{folder}: the weights lack {name}: not a complete GPT-2 model")
        tensor = tensor.float()
        if is_conv1d_weight(name):
            tensor = tensor.t()
        if name == "transformer.wte.weight":  # zero padding rows, as GPT.__init__ makes them
            tensor = torch.cat([tensor, tensor.new_zeros(padded_vocab_size(len(tensor)) - len(tensor), tensor.size(1))])
        if tensor.shape != expected[name].shape:
            raise HFError(f"{folder}: {name} has shape {list(tensor.shape)}, but config.json's sizes "
                          f"make it {list(expected[name].shape)}")
        state_dict[name] = tensor.contiguous()
    head = tensors.get("lm_head.weight")
    if head is not None and not torch.equal(head.float(), state_dict["transformer.wte.weight"][:len(head)]):
        raise HFError(f"{folder}: lm_head.weight differs from the token embedding; our gpt2 block ties them")
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict


# ----------------------------------------------------------------------------- config.json
def hf_config(model_config, eot_id):
    """config.json for GPT2LMHeadModel computing exactly what our gpt2 block computes."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model_config["vocab_size"], "n_positions": model_config["block_size"],
        "n_embd": model_config["n_embd"], "n_layer": model_config["n_layer"], "n_head": model_config["n_head"],
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu",  # the exact GELU, ours; "gelu_new" is GPT-2's tanh approximation
        "layer_norm_epsilon": 1e-5,  # torch's LayerNorm default, which ours uses
        "scale_attn_weights": True,  # scores / sqrt(head_size), as scaled_dot_product_attention does
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        **dict.fromkeys(("resid_pdrop", "embd_pdrop"), model_config.get("dropout", 0.0)),
        "attn_pdrop": 0.0,  # our dropout leaves the attention weights alone
        "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
    }


def model_config_from_hf(config, folder):
    """Our GPTConfig fields for a GPT-2 config.json; HFError for another architecture or a
    GPT-2 variant our gpt2 block does not compute."""
    kind, architectures = config.get("model_type"), config.get("architectures") or ["GPT2LMHeadModel"]
    if kind != "gpt2" or "GPT2LMHeadModel" not in architectures:
        raise HFError(f"{folder} holds a {kind} model ({', '.join(map(str, architectures))}), but init_from=hf: "
                      "reads GPT-2 (model_type gpt2, GPT2LMHeadModel) and NanoChat (NanoChatForCausalLM) only")
    n_embd = config["n_embd"]
    differences = {"layer_norm_epsilon": (config.get("layer_norm_epsilon", 1e-5), 1e-5),
                   "n_inner": (config.get("n_inner") or 4 * n_embd, 4 * n_embd),
                   "scale_attn_weights": (config.get("scale_attn_weights", True), True),
                   "scale_attn_by_inverse_layer_idx": (config.get("scale_attn_by_inverse_layer_idx", False), False),
                   "add_cross_attention": (config.get("add_cross_attention", False), False),
                   "tie_word_embeddings": (config.get("tie_word_embeddings", True), True)}
    wrong = [f"{key}={found!r} (ours: {ours!r})" for key, (found, ours) in differences.items() if found != ours]
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu", "gelu_new"):
        wrong.append(f"activation_function={activation!r} (ours: 'gelu')")
    if wrong:
        raise HFError(f"{folder}: this GPT-2 variant is not our gpt2 block: {', '.join(wrong)}")
    if activation == "gelu_new":
        print(f"note: {folder} uses GPT-2's tanh GELU (gelu_new); our block computes the exact GELU, "
              "within 5e-4 of it at every activation, so its outputs differ slightly", file=sys.stderr)
    return {"block": "gpt2", "block_size": config["n_positions"], "vocab_size": config["vocab_size"],
            "n_layer": config["n_layer"], "n_head": config["n_head"], "n_embd": n_embd, "bias": True}


def read_hf_folder(folder):
    """A local GPT-2 or NanoChat folder (config.json and model.safetensors, or
    pytorch_model.bin) as a checkpoint like train.py's, with just model, model_config,
    tokenizer (the vocabulary size and end-of-text id config.json declares) and chat (whether
    its tokenizer has the chat template export.py writes for a model fine-tuned on conversations)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        nanochat = config.get("model_type") == "nanochat"
        model_config = (model_config_from_nanochat if nanochat else model_config_from_hf)(config, folder)
    except FileNotFoundError:
        raise HFError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise HFError(f"{folder}/config.json is not a GPT-2 config: {type(error).__name__}: {error}") from None
    if (folder / "model.safetensors").is_file():
        tensors = read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        try:
            tensors = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only refuses code; anything else is a damaged file
            raise HFError(f"{folder}/pytorch_model.bin does not load: {type(error).__name__}: {error}") from None
    else:
        raise HFError(f"{folder} has neither model.safetensors nor pytorch_model.bin (sharded weights are not read)")
    tokenizer = {"vocab_size": config["vocab_size"]}
    if isinstance(config.get("eos_token_id"), int):
        tokenizer["eot_id"] = config["eos_token_id"]
    state_dict = (modern_from_hf if nanochat else gpt2_from_hf)(tensors, model_config, folder)
    return {"model": state_dict, "model_config": model_config, "tokenizer": tokenizer,
            "chat": has_our_chat_template(folder)}


# ----------------------------------------------------------------------------- NanoChat (the modern block)
# F.rms_norm without eps uses the dtype's machine epsilon: float32's is 2^-23
RMS_NORM_EPS = 2.0 ** -23
ROPE_THETA = 10000.0  # model.py's Rotary base


def nanochat_config(model_config, eot_id):
    """config.json for NanoChatForCausalLM computing exactly what our modern block computes."""
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": model_config["vocab_size"], "hidden_size": model_config["n_embd"],
        "intermediate_size": 4 * model_config["n_embd"],  # its default is 8192
        "num_hidden_layers": model_config["n_layer"], "num_attention_heads": model_config["n_head"],
        "num_key_value_heads": model_config["n_head"], "max_position_embeddings": model_config["block_size"],
        "hidden_act": "relu2", "attention_bias": False, "attention_dropout": 0.0,
        "rms_norm_eps": RMS_NORM_EPS,  # its default 1e-6 moves every norm a little
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "final_logit_softcapping": None,  # its default caps logits at 15: we trained without a cap
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id, "torch_dtype": "float32",
    }


def model_config_from_nanochat(config, folder):
    """Our GPTConfig fields for a NanoChat config.json; HFError for a variant our modern block
    does not compute (a logit softcap, another norm epsilon or rotary base, grouped keys...)."""
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    ours = nanochat_config({"vocab_size": config["vocab_size"], "n_embd": n_embd, "n_layer": config["num_hidden_layers"],
                            "n_head": n_head, "block_size": config["max_position_embeddings"]}, None)
    found = {**{key: config.get(key) for key in ("intermediate_size", "hidden_act", "attention_bias",
                                                 "final_logit_softcapping", "tie_word_embeddings", "rms_norm_eps")},
             "num_key_value_heads": config.get("num_key_value_heads") or n_head,
             "rope_theta": rope.get("rope_theta", config.get("rope_theta")), "head_dim": config.get("head_dim")}
    expected = {**{key: ours[key] for key in found if key in ours}, "rope_theta": ROPE_THETA,
                "head_dim": found["head_dim"] and n_embd // n_head}
    wrong = [f"{key}={found[key]!r} (ours: {expected[key]!r})" for key in found if found[key] != expected[key]]
    if wrong:
        raise HFError(f"{folder}: this NanoChat variant is not our modern block: {', '.join(wrong)}")
    return {"block": "modern", "block_size": config["max_position_embeddings"], "vocab_size": config["vocab_size"],
            "n_layer": config["num_hidden_layers"], "n_head": n_head, "n_embd": n_embd, "bias": False,
            "value_embeddings": False}


def swap_head_halves(weight, n_head):
    """The rows of a query or key matrix with the two halves of each head swapped: rotary's
    pairs (i, i + head_size/2) then turn the way NanoChat's turn (its own inverse)."""
    heads = weight.view(n_head, 2, -1, weight.size(-1))
    return heads.flip(1).reshape(weight.shape)


def modern_to_hf(state_dict, model_config):
    """Our modern-block state dict as NanoChatForCausalLM's tensors."""
    n_embd, n_head, vocab_size = model_config["n_embd"], model_config["n_head"], model_config["vocab_size"]
    tensors = {"model.embed_tokens.weight": state_dict["transformer.wte.weight"][:vocab_size],
               "lm_head.weight": state_dict["lm_head.weight"][:vocab_size]}
    for layer in range(model_config["n_layer"]):
        ours, theirs = f"transformer.h.{layer}.", f"model.layers.{layer}."
        q, k, v = state_dict[ours + "attn.c_attn.weight"].split(n_embd)
        tensors.update({theirs + "self_attn.q_proj.weight": swap_head_halves(q, n_head),
                        theirs + "self_attn.k_proj.weight": swap_head_halves(k, n_head),
                        theirs + "self_attn.v_proj.weight": v,
                        theirs + "self_attn.o_proj.weight": state_dict[ours + "attn.c_proj.weight"],
                        theirs + "mlp.fc1.weight": state_dict[ours + "mlp.c_fc.weight"],
                        theirs + "mlp.fc2.weight": state_dict[ours + "mlp.c_proj.weight"]})
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def modern_from_hf(hf_tensors, model_config, folder):
    """NanoChatForCausalLM's tensors as our modern-block state dict, checked against the
    shapes our GPT expects; the vocabulary's padding rows are zero, as GPT.__init__ makes them."""
    n_head = model_config["n_head"]
    with torch.device("meta"):  # shapes only, no memory
        expected = GPT(GPTConfig(**model_config)).state_dict()

    def tensor(name):
        if name not in hf_tensors:
            raise HFError(f"{folder}: the weights lack {name}: not a complete NanoChat model")
        return hf_tensors[name].float()

    padded = lambda table: torch.cat([table, table.new_zeros(padded_vocab_size(len(table)) - len(table), table.size(1))])
    state_dict = {"transformer.wte.weight": padded(tensor("model.embed_tokens.weight")),
                  "lm_head.weight": padded(tensor("lm_head.weight"))}
    for layer in range(model_config["n_layer"]):
        ours, theirs = f"transformer.h.{layer}.", f"model.layers.{layer}.self_attn."
        state_dict[ours + "attn.c_attn.weight"] = torch.cat([swap_head_halves(tensor(theirs + "q_proj.weight"), n_head),
                                                            swap_head_halves(tensor(theirs + "k_proj.weight"), n_head),
                                                            tensor(theirs + "v_proj.weight")])
        state_dict[ours + "attn.c_proj.weight"] = tensor(theirs + "o_proj.weight")
        state_dict[ours + "mlp.c_fc.weight"] = tensor(f"model.layers.{layer}.mlp.fc1.weight")
        state_dict[ours + "mlp.c_proj.weight"] = tensor(f"model.layers.{layer}.mlp.fc2.weight")
    for name, value in state_dict.items():
        if value.shape != expected[name].shape:
            raise HFError(f"{folder}: {name} has shape {list(value.shape)}, but config.json's sizes "
                          f"make it {list(expected[name].shape)}")
    return {name: value.contiguous() for name, value in state_dict.items()}


# ----------------------------------------------------------------------------- tokenizer.json
def byte_to_char():
    """GPT-2's table spelling every byte as a printable character (its encoder.py's
    bytes_to_unicode): printable Latin-1 bytes stand for themselves, the others are moved
    to 256 and up, so that a token's bytes become a string with no spaces or control codes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + moved)
            moved += 1
    return table


def bpe_merges(ranks):
    """The merges, in order, that make tiktoken's ranks: every way to split a token into two
    tokens ranked before it, ordered by the token's rank. tiktoken merges the adjacent pair
    whose joined bytes rank lowest; a BPE whose merge priority is that rank does the same."""
    merges = []
    for token, rank in ranks.items():
        merges += [(rank, ranks[token[:cut]], ranks[token[cut:]], token[:cut], token[cut:])
                   for cut in range(1, len(token))
                   if ranks.get(token[:cut], rank) < rank and ranks.get(token[cut:], rank) < rank]
    return [(left, right) for *_, left, right in sorted(merges)]


def oniguruma_pattern(pattern):
    r"""tiktoken's split pattern as the tokenizers library's regex engine (Oniguruma, Ruby
    syntax) reads it the same. One spelling differs: Ruby has no possessive interval, so
    `\p{N}{1,3}+` would mean (\p{N}{1,3})+, any run of digits; the atomic group (?>...)
    means what tiktoken's engine reads, and tiktoken reads it too."""
    return re.sub(r"(\\p\{\w+\}|\[[^\]]*\])(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", pattern)


def tokenizer_json(encoder, chat=False):
    """tokenizer.json (the tokenizers library's format) for a tiktoken.Encoding: the same
    split regex, then byte-level BPE with the same vocabulary and merge order, and
    end-of-text (and the chat tokens) as special tokens. ignore_merges: a chunk that is a token
    is that token, as in tiktoken. The special tokens go in the order of their ids: the
    tokenizers library gives each one that is not in the vocabulary the next free id, in the
    order listed, whatever its "id" says. chat: a normalizer undoes CHAT_TEMPLATE's escape
    (owngpt/chat.py) in the text between special tokens, which are found before it runs
    ("normalized": false), so that a message's text is plain text, as it is to us."""
    spell = byte_to_char()
    special = {text: encoder.encode_single_token(text)
               for text in sorted(encoder.special_tokens_set, key=encoder.encode_single_token)}
    ranks = {encoder.decode_single_token_bytes(rank): rank for rank in range(encoder.n_vocab)
             if rank not in special.values()}
    as_text = lambda token: "".join(spell[byte] for byte in token)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for text, token_id in special.items()],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": f"<{ESCAPE}|"}, "content": "<|"},
            {"type": "Replace", "pattern": {"String": 2 * ESCAPE}, "content": ESCAPE}]} if chat else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": oniguruma_pattern(encoder._pat_str)}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {as_text(token): rank for token, rank in ranks.items()},
                  "merges": [f"{as_text(left)} {as_text(right)}" for left, right in bpe_merges(ranks)]},
    }


def read_tokenizer_json(folder):
    """The tiktoken.Encoding of a folder's tokenizer.json, as export.py writes it or as GPT-2's
    comes (a ByteLevel pre-tokenizer with GPT-2's regex). Token ids are taken as tiktoken
    ranks, which holds for both: their ids follow the merge order."""
    path = Path(folder) / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        unspell = {char: byte for byte, char in byte_to_char().items()}
        ranks = {bytes(unspell[char] for char in token): token_id for token, token_id in data["model"]["vocab"].items()}
        special = {token["content"]: token["id"] for token in data.get("added_tokens", []) if token.get("special")}
        steps = data["pre_tokenizer"].get("pretokenizers", [data["pre_tokenizer"]])
        if steps[0]["type"] == "Split":
            pattern = steps[0]["pattern"]["Regex"]
        elif steps[0]["type"] == "ByteLevel" and steps[0].get("use_regex", True):
            pattern = GPT2_SPLIT_PATTERN
        else:
            raise ValueError(f"pre-tokenizer {steps[0]['type']} is not a byte-level BPE's")
        return tiktoken.Encoding(f"hf-{Path(folder).name}", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=special)
    except FileNotFoundError:
        raise HFError(f"{folder} has no tokenizer.json") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise HFError(f"{path} is not a byte-level BPE tokenizer: {type(error).__name__}: {error}") from None


def tokenizer_config(block_size, chat=False):
    """tokenizer_config.json: the fast tokenizer, end-of-text as bos and eos, nothing added
    to the text (we start documents with end-of-text ourselves) and decoding left exact; a
    model fine-tuned on conversations gets the chat template, which starts them the same way."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": block_size, **({"chat_template": CHAT_TEMPLATE} if chat else {})}


def has_our_chat_template(folder):
    """Whether a folder's tokenizer says it talks as chat.py does: the chat template export.py
    writes, in tokenizer_config.json or in the chat_template.jinja transformers saves it to."""
    config, jinja = Path(folder) / "tokenizer_config.json", Path(folder) / "chat_template.jinja"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    except (ValueError, AttributeError) as error:
        raise HFError(f"{config} is not a JSON object: {type(error).__name__}: {error}") from None
    return (jinja.read_text(encoding="utf-8") if jinja.is_file() else template) == CHAT_TEMPLATE


# ----------------------------------------------------------------------------- the folder
def write_hf_folder(dest, checkpoint, encoder, model_card):
    """Write what AutoModelForCausalLM and AutoTokenizer.from_pretrained(dest) load: a gpt2
    block as GPT2LMHeadModel, a modern one as NanoChatForCausalLM; returns the paths written.
    HFError, and nothing written, for a model no transformers architecture can express."""
    model_config = checkpoint["model_config"]
    problems = unexportable(model_config)
    if problems:
        raise HFError(f"cannot export to a transformers architecture: {'; '.join(problems)}")
    dest.mkdir(parents=True, exist_ok=True)
    eot_id = encoder.eot_token
    modern, chat = model_config["block"] == "modern", bool(checkpoint.get("chat"))
    files = {
        "config.json": (nanochat_config if modern else hf_config)(model_config, eot_id),
        # generate stops where chat.py's answer stops: at the end of the assistant's turn
        "generation_config.json": {"bos_token_id": eot_id,
                                   "eos_token_id": encoder.encode_single_token(END) if chat else eot_id},
        "tokenizer.json": tokenizer_json(encoder, chat),
        "tokenizer_config.json": tokenizer_config(model_config["block_size"], chat),
        "special_tokens_map.json": {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT},
    }
    for name, content in files.items():
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        atomic_write(dest / name, lambda file: file.write(text.encode()))
    write_safetensors(dest / "model.safetensors", (modern_to_hf if modern else gpt2_to_hf)(checkpoint["model"],
                                                                                          model_config),
                      metadata={"format": "pt"})
    atomic_write(dest / "README.md", lambda file: file.write(model_card.encode()))
    return [dest / name for name in (*files, "model.safetensors", "README.md")]
