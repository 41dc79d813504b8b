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


ARITH_WORDS = [str(d) for d in range(10)] + [f"{sign}{d}" for sign in "+-" for d in range(10)] + ["="]


def make_arith_tokenizer():
    """A word-level tokenizer for data.py's arithmetic task: a token per digit, per signed operand, and "=" (35).

    "3 + 5 - 7 =" -> <|im_start|> 3 +5 -7 = (a BOS, then one token per operand), the answer "8 1" -> 8 1.
    Why this shape: each answer digit is "the previous digit (the current input token) plus the operand a fixed
    distance back", and the BOS anchors the start of the problem; byte-level BPE would merge pieces like " 8"
    and "8 1" and spend a 0.1M-param model on spellings. Measured on CPU (0.37M-param Qwen3, SFT, batch 64,
    lr 3e-3): on L2..L8 mixed, neither this tokenizer nor one token per character (no BOS) left chance level in
    1,000-2,500 steps; on L2..L4 this one left the plateau after ~1,500 steps and had 82% of L4 answers fully
    right (teacher-forced) at 2,500. One token per character was not tried on L2..L4.

    Whitespace separates words, digits split one by one (12 -> 1 2), "+ 5" and "+5" are the same token; anything
    else maps to <|unk|>. Decoding joins tokens with spaces ("8 1"), how rewards.py reads the scratchpad. Same
    special tokens as make_tokenizer (eos "<|im_end|>", pad "<|endoftext|>", BOS "<|im_start|>", added to every
    encoded text unless add_special_tokens=False), no chat template: data.py prompts with the bare problem.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + ["<|unk|>"] + ARITH_WORDS)}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    words.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\+\s+"), "+"),
                                             normalizers.Replace(Regex(r"-\s+"), "-")])
    words.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.Split(Regex(r"[+-]?\d|\D"), "isolated")])
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


def save_tiny(out_dir: str, tokenizer=None, **model_kwargs) -> str:
    """Write a tiny model + tokenizer to `out_dir` in Hugging Face format (vLLM and from_pretrained load it)."""
    tokenizer = tokenizer or make_tokenizer()
    model = make_model(tokenizer, **model_kwargs)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["arith"]):
        sys.exit("usage: python tiny.py OUT_DIR [arith]")
    print(save_tiny(sys.argv[1], make_arith_tokenizer() if sys.argv[2:] == ["arith"] else None))
