"""Local fixture checkpoints: a Phi-3-architecture model with a locally trained tokenizer.

`tiny` is trained briefly and deterministically on the synthetic chat task in `task.py` so that its
answers are checkable; `bench` has realistic shapes and random weights for speed measurements.
Both are cached under the slmflow home and rebuilt only when their recipe (this module, the task
and the size's settings) changes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from slmflow.checkpoints import task
from slmflow.paths import slmflow_home
from slmflow.progress import Progress

SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)

# Phi-3-mini-4k-instruct's chat template, verbatim.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class FixtureSpec:
    """Shapes and training budget of one fixture size."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tokenizer_vocab: int
    train_steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0


SIZES: dict[str, FixtureSpec] = {
    "tiny": FixtureSpec(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=512,
        vocab_size=1088,
        max_position_embeddings=2048,
        tokenizer_vocab=1024,
        train_steps=400,
        batch_size=32,
        learning_rate=3e-3,
    ),
    "bench": FixtureSpec(
        hidden_size=1024,
        num_layers=8,
        num_heads=16,
        intermediate_size=2816,
        vocab_size=32064,
        max_position_embeddings=4096,
        tokenizer_vocab=1024,
        train_steps=0,
        batch_size=0,
        learning_rate=0.0,
    ),
}


def recipe_digest(size: str) -> str:
    """A digest of everything that determines the fixture: rebuilding is needed when it changes."""
    import torch
    import transformers

    parts = [
        inspect.getsource(inspect.getmodule(recipe_digest)),  # type: ignore[arg-type]
        inspect.getsource(task),
        json.dumps(asdict(SIZES[size]), sort_keys=True),
        torch.__version__,
        transformers.__version__,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def fixture_path(size: str) -> Path:
    return slmflow_home() / "fixtures" / f"phi3-{size}-{recipe_digest(size)}"


def build_fixture(size: str = "tiny", *, force: bool = False, progress: Progress | None = None) -> Path:
    """Return the folder of the fixture checkpoint of `size`, building it if its recipe changed."""
    if size not in SIZES:
        raise ValueError(f"unknown fixture size {size!r}; choose one of {', '.join(SIZES)}")
    target = fixture_path(size)
    if target.is_dir() and (target / "config.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a killed build never leaves a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _build_into(staging, SIZES[size], progress)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_into(folder: Path, spec: FixtureSpec, progress: Progress | None) -> None:
    import torch

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    tokenizer = _train_tokenizer(spec.tokenizer_vocab)
    model = _new_model(spec, tokenizer)
    if spec.train_steps:
        _train(model, tokenizer, spec, progress)
    else:
        _favour_known_tokens(model, len(tokenizer))
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def _favour_known_tokens(model, known: int) -> None:
    """Make a random model emit ids its tokenizer can decode: a realistic 32064-row vocabulary
    with a small local tokenizer would otherwise stream mostly empty text."""
    import torch

    with torch.no_grad():
        model.lm_head.weight[known:] = 0.0
        model.lm_head.weight[:known] *= 10.0


def _corpus() -> list[str]:
    texts = []
    for conversation in task.training_conversations():
        texts.append(render_chat(conversation, add_generation_prompt=False))
        texts.append(render_compact(conversation))
    return texts


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    import jinja2

    template = jinja2.Environment().from_string(PHI3_CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, eos_token="<|endoftext|>")


def render_compact(messages: list[dict[str, str]]) -> str:
    """The hand-written, newline-free Phi-3 prompt style the reference tutorial uses."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


def _train_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Plain text around the task so the vocabulary covers ordinary words, not only the answers.
    extra = [
        "You are a helpful assistant. Hello, how are you today? I am fine, thank you.",
        "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
        '{"name": "value", "answer": true, "items": [1, 2, 3]}',
    ]
    bpe.train_from_iterator(_corpus() + extra, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        chat_template=PHI3_CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _new_model(spec: FixtureSpec, tokenizer):  # -> Phi3ForCausalLM
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's {spec.vocab_size}")
    # The ORT GenAI builder finds the LM head by its output width, so no other Linear may share it.
    if spec.vocab_size in (spec.hidden_size, 3 * spec.hidden_size, 2 * spec.intermediate_size):
        raise ValueError("vocab_size must differ from every projection's output width")
    config = Phi3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        original_max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
        architectures=["Phi3ForCausalLM"],
    )
    model = Phi3ForCausalLM(config)
    # Like Phi-3-instruct: a turn ends at <|end|> or <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=[eos, end], pad_token_id=eos, do_sample=False
    )
    return model


def _examples(tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) for each training text; loss covers only the answer."""
    end = "<|end|>"
    examples = []
    for conversation in task.training_conversations():
        answer = conversation[-1]["content"]
        for prompt in (
            render_chat(conversation[:-1], add_generation_prompt=True),
            render_compact(conversation[:-1]) + "<|assistant|>",
        ):
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
            answer_ids = tokenizer.encode(answer + end, add_special_tokens=False)
            examples.append((prompt_ids + answer_ids, len(prompt_ids)))
    return examples


def _train(model, tokenizer, spec: FixtureSpec, progress: Progress | None) -> None:
    import torch

    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=spec.train_steps, pct_start=0.1
    )
    rng = random.Random(spec.seed)
    model.train()
    for step in range(spec.train_steps):
        batch = rng.sample(examples, spec.batch_size)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress:
            progress(f"training (loss {loss.item():.3f})", step + 1, spec.train_steps)
