"""Tiny real models and tokenizers, built locally from a config: no model hub, no download.

Used by the tests, the tiny CPU preset of train.py, and the miniature reproduction. Everything here is a
*real* Hugging Face model (`Qwen3ForCausalLM` from a `Qwen3Config`) and a real fast tokenizer
(`PreTrainedTokenizerFast` over a byte-level BPE trained on a few KB of text), so vLLM's CPU engine,
`from_pretrained` and the trainer treat them exactly like Qwen3-0.6B, only smaller.

    python tiny.py OUT_DIR            # writes a tiny model + tokenizer that vLLM and transformers load
    python tiny.py OUT_DIR arith      # the same with the word-level arithmetic tokenizer (the study)

Constraints learned the hard way (docs/cpu.md): vLLM's CPU attention needs head_dim in
{32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}; vocab_size must equal len(tokenizer).
"""
import os
import sys

# ChatML, the format of Qwen's chat template (the real one also handles tools and thinking; not needed here).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Text the tokenizer is trained on: the vocabulary of the project's tasks (K&K puzzles, math, tags).
_CORPUS = """
A very special island is inhabited only by knights and knaves. Knights always tell the truth, and knaves
always lie. You meet 8 inhabitants: Alice, Bob, Charlie, David, Emma, Frank, Grace and Henry. Alice said
that Bob is a knight and Charlie is a knave. Bob told you that if Charlie is a knight then David is a
knave. Charlie said, "Emma is a knight or Frank is a knave." David noted, "Grace is a knight if and only
if Henry is a knave." Emma claimed that it is not the case that Alice is a knave. So who is a knight and
who is a knave? <think> Let us reason step by step. Suppose Alice is a knight. Then her statement is true,
so Bob is a knight and Charlie is a knave. </think> <answer> (1) Alice is a knight (2) Bob is a knave
(3) Charlie is a knight (4) David is a knave (5) Emma is a knight </answer>
Solve the following math problem. Put the final answer in \\boxed{}. Find the sum of all integers n such
that n^2 + 3n + 2 = 0. The answer is \\boxed{-3}. Let x = \\frac{1}{2}, then 2x + 1 = 2, so \\dfrac{3}{4}
0 1 2 3 4 5 6 7 8 9 10 100 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " \\sqrt{2} \\pi \\cdot \\times
"""


def make_tokenizer(corpus: str = _CORPUS, vocab_size: int = 512):
    """A byte-level BPE tokenizer with Qwen's special tokens and a ChatML chat template.

    Byte-level means every string round-trips (any unicode a policy emits is encodable), so rewards
    and log-probs see exactly the text the model produced.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([corpus] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    return tok


ARITH_WORDS = [str(d) for d in range(10)] + ["+", "-", "=", "_"]


def make_arith_tokenizer():
    """A word-level tokenizer for data.py's arithmetic task: a token per digit, per sign, "=" and the filler "_" (18).

    "3 + 5 - 7 =" -> <|im_start|> 3 + 5 - 7 = (a BOS, then one token per character), the answer "8 1" -> 8 1. The
    arith task fills its prompt with "_ _" per missing operand up to a fixed width (tasks.Arith), so operand j is
    always token 2j - 1 and answer digit t always sits at the same position. Why this shape, measured on CPU with
    the study's GPT-2 models (SFT on L2..L8 mixed, batch 128, lr 2e-3; experiments/mini_repro/README.md): with the
    fill, a 0.35M model learns every level at once (all 1.00 by step 200-300); without it, level by level (L7 0.78
    after 850 steps).
    A sign and its digit as one token ("+5") made the student's crossing from chance to 1.00 take ~10 steps for
    every level at once; as two tokens it takes ~125, hardest levels last, which leaves partial students to study.
    Byte-level BPE would merge pieces like " 8" and "8 1" and spend a 0.1M-param model on spellings.

    Whitespace separates words and every character is its own token (12 -> 1 2); anything else maps to <|unk|>.
    Decoding joins tokens with spaces ("8 1"), how rewards.py reads the scratchpad. Same special tokens as
    make_tokenizer (eos "<|im_end|>", pad "<|endoftext|>", BOS "<|im_start|>", added to every encoded text unless
    add_special_tokens=False), no chat template: data.py prompts with the bare problem.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + ["<|unk|>"] + ARITH_WORDS)}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    words.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.Split(Regex(r"."), "isolated")])
    bos = "<|im_start|>"
    words.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token=bos, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|unk|>")


def make_model(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
               num_kv_heads: int = 1, head_dim: int = 32, intermediate_size: int = 128,
               tie_word_embeddings: bool = False, max_position_embeddings: int = 2048, seed: int = 0):
    """A randomly initialised Qwen3ForCausalLM (fp32), sized by the arguments. ~80K params by default."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings, torch_dtype="float32",
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float().eval()


def make_gpt2(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
              tie_word_embeddings: bool = False, max_position_embeddings: int = 64, init: str = "normal",
              init_std: float | None = None, seed: int = 0):
    """A randomly initialised GPT2LMHeadModel (fp32): learned absolute positions, pre-LayerNorm, a GELU MLP of 4x
    hidden_size, biases. The study's family: with the arith task's fixed-width prompts a learned position table
    gives each operand and each answer digit its own slot. hidden_size / num_heads must be a head_dim vLLM's CPU
    attention takes (32 here).

    init: how the weights start, deterministic under `seed`.
      "normal"         GPT-2's own scheme at standard deviation init_std (default 0.1): token and position
                       embeddings, attention / MLP input weights and the head N(0, init_std), the two residual
                       projections (c_proj) N(0, init_std / sqrt(2 * num_layers)), biases 0, LayerNorms 1 and 0.
                       GPT-2's own 0.02 left both study models at chance for 1,500 SFT steps on the arith task; 0.1
                       had them solve L2..L8 in under 300 (measured; experiments/mini_repro/README.md). This is
                       not PyTorch's default: its embeddings are N(0, 1), 10x the spread of N(0, 0.1).
      "torch_default"  each module as PyTorch initialises it (torch_default_init_): embeddings N(0, 1); Conv1D
                       (weight [in, out]) and the head weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in
                       the input width; LayerNorms 1 and 0. init_std does not apply."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if init not in ("normal", "torch_default"):
        raise ValueError(f"make_gpt2: init={init!r}; use 'normal' or 'torch_default'")
    if init == "torch_default" and init_std is not None:
        raise ValueError("make_gpt2: init_std is the 'normal' init's standard deviation; 'torch_default' takes none")
    init_std = 0.1 if init_std is None else init_std
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                        n_positions=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
                        initializer_range=init_std,  # no dropout: the trainer's pi_old must equal the sampler's pi
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).float().eval()
    if init == "torch_default":
        torch_default_init_(model, seed)
    return model


def torch_default_init_(model, seed: int):
    """Re-initialise a GPT-2 model in place the way PyTorch initialises each module when it is built, from a
    generator of its own seeded by `seed` (the same weights whatever transformers' own init drew before):
    nn.Embedding N(0, 1) (token and position tables); nn.Linear (the head) and transformers' Conv1D weight and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is nn.Linear's kaiming_uniform_(a=sqrt(5)), with fan_in the input
    width: a Linear weight is [out, in], a Conv1D weight [in, out], so fan_in is its first dimension; LayerNorm
    weight 1, bias 0. A head tied to the token embedding stays the embedding. Any other parameter is an error."""
    import math

    import torch
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in done]
            if not params:
                continue
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (torch.nn.Linear, Conv1D)):
                fan_in = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else module.weight.shape[0]
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=gen)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=gen)
            else:
                raise TypeError(f"torch_default_init_: no PyTorch default known for {name} ({type(module).__name__})")
            done.update(id(p) for p in params)
    return model


def save_tiny(out_dir: str, tokenizer=None, family: str = "qwen3", **model_kwargs) -> str:
    """Write a tiny model (family "qwen3": make_model, "gpt2": make_gpt2) + tokenizer to `out_dir` in Hugging Face
    format (vLLM and from_pretrained load it)."""
    tokenizer = tokenizer or make_tokenizer()
    model = {"qwen3": make_model, "gpt2": make_gpt2}[family](tokenizer, **model_kwargs)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["arith"]):
        sys.exit("usage: python tiny.py OUT_DIR [arith]")
    print(save_tiny(sys.argv[1], make_arith_tokenizer() if sys.argv[2:] == ["arith"] else None))
