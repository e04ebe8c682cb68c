"""A deterministic tiny byte-level BPE vocabulary written as an official-format ``qwen.tiktoken`` file.

This module owns the built-in training corpus (English, Chinese, digits, punctuation, ChatML role names and
the vocabulary of the synthetic shapes dataset) and the conversion from a ``tokenizers`` BPE training run to
tiktoken ranks: ids 0..255 are the single bytes in GPT-2 byte-to-unicode order (as in the official file,
id 0 = ``b"!"``), then merge products in training order. Tiny random models and tests use it instead of the
2.7 MB official file.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from qwenvl_core.errors import TokenizerError
from qwenvl_core.models.qwen_vl.tokenizer import PAT_STR

DEFAULT_N_RANKS = 1024
# Extra merges asked of the trainer so that merges whose product already exists can be skipped.
_MERGE_SLACK = 64

_ENGLISH = """\
You are a helpful assistant.
system
user
assistant
Picture 1: Picture 2: Picture 3: Picture 4:
What is in the picture? What colour is the shape? What shape is it? Which shape is on the left?
How many circles are there? How many squares are there? How many triangles are there?
Where is the red circle? Where is the blue square? Where is the green triangle?
Is there a yellow circle? Is there a purple square? Is there an orange triangle?
There is a red circle at the top left. There is a green square at the bottom right.
There are two blue triangles in the center. There are three white circles and one black square.
The yellow square is to the right of the purple circle. The orange triangle is above the white square.
The black circle is below the green triangle, near the bottom of the picture.
Colours: red, green, blue, yellow, purple, orange, white, black.
Shapes: circle, square, triangle. Circles, squares, triangles.
Positions: left, right, top, bottom, center, top left, top right, bottom left, bottom right.
The answer is 0. The answer is 1. The answer is 2. The answer is 3. The answer is 4. The answer is 5.
Count: 6 shapes, 7 shapes, 8 shapes, 9 shapes, 10 shapes, 12 shapes, 24 shapes, 100 shapes.
Generate the caption in English with grounding:
<ref>the red circle</ref><box>(120,340),(250,470)</box> is at the left of
<ref>the blue square</ref><box>(600,100),(850,350)</box>.
Describe the image in detail. The image shows a simple drawing on a white background.
Yes, there is. No, there is not. I can see a circle, a square and a triangle.
A quick brown fox jumps over the lazy dog. The weather today is sunny and warm.
Machine learning models learn patterns from data. Training a model needs examples, time and patience.
Fine-tuning adapts a pretrained model to a new task with a small learning rate.
The tokenizer splits text into tokens; the model reads tokens and writes tokens.
Please answer the question with a single word. Please describe what you see.
Hello! How are you? I'm fine, thank you. It's a nice day, isn't it? We'll see; they've gone.
She said: "The shapes are drawn with different colours." He asked: 'Which one is bigger?'
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 99 100 256 448 1000.
Punctuation: . , ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `
def main():
    return {"shape": "circle", "colour": "red", "count": 3}
The largest shape is the green circle in the top right corner of the picture.
The smallest shape is the yellow triangle in the bottom left corner of the picture.
All the shapes are the same colour. None of the shapes overlap. Two of the shapes touch each other.
In the first picture there is a circle; in the second picture there is a square.
Compare the two pictures and tell me what is different between them.
"""

_CHINESE = """\
你是一个有帮助的助手。
图片里有一个红色的圆形。图片里有两个蓝色的正方形。图片里有三个绿色的三角形。
这是什么颜色？这是什么形状？图片中有几个圆形？左边的形状是什么？
红色的圆形在左上角。黄色的正方形在右下角。紫色的三角形在中间。
橙色、白色、黑色、红色、绿色、蓝色、黄色、紫色。圆形、正方形、三角形。
上面、下面、左边、右边、中间、左上角、右上角、左下角、右下角。
请用一个词回答这个问题。请详细描述这张图片。
今天天气很好，我们去公园散步吧。机器学习模型从数据中学习规律。
训练模型需要数据、时间和耐心。微调可以让预训练模型适应新的任务。
中文和英文都可以作为输入，模型会用同样的语言回答。
这张图片展示了一个简单的几何图形，背景是白色的。
第一张图片里有一个圆形，第二张图片里有一个正方形。请比较这两张图片有什么不同。
最大的形状是右上角的绿色圆形，最小的形状是左下角的黄色三角形。
所有的形状都是同一种颜色。没有形状互相重叠。
你好！你好吗？我很好，谢谢。今天是星期一，明天是星期二。
北京是中国的首都。长城很长，黄河很长，长江更长。
一二三四五六七八九十百千万。数字：0、1、2、3、4、5、6、7、8、9。
"""

_SHAPES_WORDS = (
    "red green blue yellow purple orange white black",
    "circle square triangle circles squares triangles",
    "left right top bottom center",
    "how many what colour shape is there which where",
)


def tiny_corpus() -> list[str]:
    """The built-in training corpus, one string per line (plus generated shape sentences)."""
    lines = _ENGLISH.splitlines() + _CHINESE.splitlines()
    colours = _SHAPES_WORDS[0].split()
    shapes = _SHAPES_WORDS[1].split()[:3]
    places = ["top left", "top right", "bottom left", "bottom right", "center"]
    for i, colour in enumerate(colours):
        for j, shape in enumerate(shapes):
            place = places[(i + j) % len(places)]
            lines.append(f"Picture {i + 1}: There is a {colour} {shape} at the {place}.")
            lines.append(f"How many {colour} {shape}s are there? {i + j}")
    return lines + list(_SHAPES_WORDS)


def _gpt2_byte_order() -> list[int]:
    """The 256 byte values in GPT-2 ``bytes_to_unicode`` order (printable ones first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    return printable + [b for b in range(256) if b not in printable]


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2 ``bytes_to_unicode``: the char the ByteLevel pre-tokenizer uses for each byte."""
    order = _gpt2_byte_order()
    n_printable = 188
    chars = [chr(b) for b in order[:n_printable]] + [chr(256 + k) for k in range(256 - n_printable)]
    return {c: b for c, b in zip(chars, order, strict=True)}


def _train_merges(n_merges: int) -> list[tuple[str, str]]:
    """Run the ``tokenizers`` BPE trainer on the corpus; merges (ByteLevel strings) in training order."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def tiny_ranks(n_ranks: int = DEFAULT_N_RANKS) -> dict[bytes, int]:
    """``{token_bytes: rank}`` with exactly ``n_ranks`` entries: 256 bytes, then merge products."""
    if n_ranks < 256:
        raise TokenizerError(f"a byte-level vocabulary needs at least 256 ranks, got {n_ranks}")
    to_byte = _unicode_to_byte()
    ranks = {bytes([b]): i for i, b in enumerate(_gpt2_byte_order())}
    for left, right in _train_merges(n_ranks - 256 + _MERGE_SLACK):
        if len(ranks) == n_ranks:
            break
        token = bytes(to_byte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    if len(ranks) != n_ranks:
        raise TokenizerError(
            f"the built-in corpus yields only {len(ranks)} ranks, fewer than the {n_ranks} asked for"
        )
    return ranks


def write_tiktoken_file(ranks: dict[bytes, int], out_path: str | Path) -> Path:
    """Write ``ranks`` as ``base64(token) rank`` lines in rank order."""
    out_path = Path(out_path)
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=_rank)
    ]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(lines), encoding="ascii")
    return out_path


def _rank(item: tuple[bytes, int]) -> int:
    return item[1]


def train_tiny_tokenizer(out_path: str | Path, n_ranks: int = DEFAULT_N_RANKS) -> Path:
    """Train the tiny vocabulary (deterministic) and write it to ``out_path`` as a ``qwen.tiktoken`` file."""
    return write_tiktoken_file(tiny_ranks(n_ranks), out_path)
