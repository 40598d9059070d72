"""Build a tiny random-weight Llama model + tokenizer that a real vLLM (CPU) can serve.

Run by :func:`tests.support.tiny_model.build_tiny_model` with the vLLM venv's python
(``scripts/provision-vllm.sh``), which has torch, transformers and tokenizers; the project venv
does not, so nothing here may be imported from the project's tests.

    python tests/support/tiny_model_builder.py OUT_DIR

writes, into the (new or empty) OUT_DIR, ``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` and
``chat_template.jinja`` (transformers 5 keeps the chat template in its own file). The weights are
random (seeded): generated text is gibberish, but token counts are real. What makes it servable
(see shared/docs/vllm.md): head_dim 64 (the CPU attention kernels reject 16), a byte-level BPE
with ``<unk>``/``<s>``/``</s>``, bos/eos/unk set on the tokenizer, and a chat template (without
one /v1/chat/completions cannot format messages).
"""

from __future__ import annotations

import os
import pathlib
import random
import sys

SEED = 1234
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (bos_token_id=1, eos_token_id=2)

# Jinja chat template; OpenAI content parts arrive already flattened to a string by vLLM.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORD_TEXT = (
    "the a an model models gateway policy plane token tokens request requests response rate "
    "limit limits quota user users tenant tier free premium enterprise server servers chat "
    "completion completions embedding stream usage prompt system assistant hello world how "
    "are you today what is this that and or not with for from into over under fast slow "
    "small large tiny llama vllm envoy kubernetes redis authorization key keys allow deny "
    "count counts minute hour day second one two three four five six seven eight nine ten"
)
_WORDS = _WORD_TEXT.split()


def _corpus(lines: int = 4000) -> list[str]:
    """Deterministic pseudo-text for the tokenizer trainer (fixed seed, no data set needed)."""
    rng = random.Random(SEED)
    out: list[str] = []
    for _ in range(lines):
        n = rng.randint(3, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 9999)}"
        if rng.random() < 0.1:
            sentence = f"<|{rng.choice(['system', 'user', 'assistant'])}|>\n{sentence}"
        out.append(sentence)
    return out


def build(out_dir: pathlib.Path) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch  # noqa: PLC0415 (only in the vLLM venv)
    from tokenizers import (  # noqa: PLC0415
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (  # noqa: PLC0415
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    random.seed(SEED)
    torch.manual_seed(SEED)

    # --- tokenizer: byte-level BPE trained on the corpus above --------------------------------
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    eos_id = tok.token_to_id("</s>")
    unk_id = tok.token_to_id("<unk>")
    if (unk_id, bos_id, eos_id) != (0, 1, 2):
        raise SystemExit(f"unexpected special token ids: {(unk_id, bos_id, eos_id)}")
    # "<s>" before every encoded text (completions); the chat template adds its own bos_token
    # and vLLM encodes a rendered chat prompt without special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=256,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    vocab_size = len(hf_tok)

    # --- model: LlamaForCausalLM, hidden 128 / 2 heads -> head_dim 64 ------------------------
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Saved in the dtype it is served in (--dtype bfloat16): half the size, and vLLM does not
    # warn about every float32 weight it downcasts.
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    hf_tok.save_pretrained(out_dir)

    # Sanity: the files load back and the chat template renders.
    loaded = PreTrainedTokenizerFast.from_pretrained(out_dir)
    rendered = loaded.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str) or "<|assistant|>" not in rendered:
        raise SystemExit(f"chat template did not render: {rendered!r}")
    params = sum(p.numel() for p in model.parameters())
    print(f"built tiny llama: vocab={vocab_size} params={params} -> {out_dir}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    build(pathlib.Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
