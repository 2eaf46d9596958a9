"""The offline demo task: hh-rlhf-style preference pairs generated on the fly, and a tokenizer for them.

- The human asks about one of 16 topics (cats, chess, volcanoes, ...), sometimes with a follow-up turn
  ("what else?") after a first answer on the same topic. The chosen response is polite AND on topic.
  The rejected one is either polite but about ANOTHER topic (half the pairs: only the prompt tells
  which response is right) or on topic but rude (the other half). Both come from the same templates,
  so length says nothing; rudeness alone gives 75%, the rest needs the prompt.
- The test split asks with (topic, question template) combinations never seen in training.
- demo_ranked (demo_ranked_rows): the same prompts with K = 4 responses graded by those two notions, as
  plain ranked rows {"prompt", "responses", "scores"}: polite on topic 3, rude on topic 2, polite on
  another topic 1, rude on another topic 0, in a random order (position says nothing).
- No files, no network: `data.iter_pairs("demo", split)` reads demo_rows; demo_tokenizer() is a
  word-level tokenizer (a few hundred words) that covers every word the generator writes.
"""
import random
import re
from typing import Iterator

from support.readers import ASSISTANT
from support.tokenizer import Tokenizer

DEMO_SIZES = {"train": 4000, "test": 500}
DEMO_TOPICS = [  # (what the human asks about, words an answer on that topic uses)
    ("cats", "kitten whiskers purring fur litter"),
    ("dogs", "puppy leash barking fetch collar"),
    ("baking", "bread oven flour dough yeast"),
    ("gardening", "soil seeds tomatoes compost watering"),
    ("astronomy", "stars planets telescope orbit galaxy"),
    ("chess", "knight bishop checkmate pawns openings"),
    ("guitar", "strings chords frets strumming amplifier"),
    ("running", "marathon sneakers pace stretching endurance"),
    ("coffee", "espresso beans roasting grinder caffeine"),
    ("oceans", "waves tides coral salt whales"),
    ("photography", "camera lens aperture exposure tripod"),
    ("volcanoes", "lava magma eruption crater ash"),
    ("painting", "canvas brushes colors palette acrylic"),
    ("cycling", "bicycle gears helmet pedals saddle"),
    ("swimming", "pool goggles strokes laps diving"),
    ("weather", "rain clouds thunder forecast humidity"),
]
DEMO_QUESTIONS = [
    "can you tell me about {s}?", "what should i know about {s}?",
    "i want to learn about {s}. where do i start?", "any tips on {s}?", "could you explain {s} to me?",
    "i am curious about {s}. what is interesting about it?", "what do you think about {s}?",
    "please give me some advice about {s}.", "my friend loves {s}. what can you tell me?",
    "help me understand {s}, please.",
]
DEMO_FIRST_ANSWERS = ["{a} is a good place to start.", "people often begin with {a} and {b}."]
DEMO_FOLLOW_UPS = ["tell me more.", "what else?", "interesting, go on.", "can you say more about that?"]
DEMO_BODIES = [
    "{s} is a wonderful subject. start with {a} and {b}, then learn about {c}.",
    "most people who enjoy {s} care about {a}. {b} and {c} matter too.",
    "the key ideas are {a}, {b} and {c}.",
    "when it comes to {s}, {a} is important. also think about {b}.",
    "a good first step is {a}. after that, practice with {b} and {c}.",
    "{a} and {b} are the heart of {s}.",
    "experts in {s} often talk about {a} and {b}.",
    "i would focus on {a} first, and then on {c}.",
]
DEMO_POLITE = (["sure!", "great question!", "happy to help.", "of course.", "good question!", "glad you asked."],
               ["i hope this helps!", "let me know if you have more questions.", "have fun!", "enjoy learning!",
                "good luck!"])
DEMO_RUDE = (["ugh.", "seriously?", "whatever.", "what a stupid question.", "not this again.", "boring."],
             ["now go away.", "figure out the rest yourself.", "do not bother me again.",
              "this is a waste of my time.", "stop asking me things."])
DEMO_SPECIAL = ["<|endoftext|>", "<|im_end|>", "<unk>"]  # pad, eos, unknown


def demo_rows(split: str) -> Iterator[dict]:
    """hh-rlhf-style transcripts {"chosen", "rejected"}, generated lazily and deterministically."""
    rng = random.Random(f"demo/{split}")
    for topic, question in _demo_questions(rng, split):
        prompt = _demo_prompt(rng, topic, question)
        chosen = _demo_answer(rng, topic, DEMO_POLITE)
        if rng.random() < 0.5:
            other = rng.choice([t for t in range(len(DEMO_TOPICS)) if t != topic])
            rejected = _demo_answer(rng, other, DEMO_POLITE)
        else:
            rejected = _demo_answer(rng, topic, DEMO_RUDE)
        yield {"chosen": prompt + chosen, "rejected": prompt + rejected}


def demo_ranked_rows(split: str) -> Iterator[dict]:
    """Plain ranked rows {"prompt", "responses", "scores"} of the demo's prompts, K = 4 (see the docstring)."""
    rng = random.Random(f"demo_ranked/{split}")
    for topic, question in _demo_questions(rng, split):
        other = rng.choice([t for t in range(len(DEMO_TOPICS)) if t != topic])
        graded = [(3, topic, DEMO_POLITE), (2, topic, DEMO_RUDE), (1, other, DEMO_POLITE), (0, other, DEMO_RUDE)]
        rng.shuffle(graded)
        prompt = _demo_prompt(rng, topic, question)
        yield {"prompt": prompt, "responses": [_demo_answer(rng, t, style) for _, t, style in graded],
               "scores": [score for score, _, _ in graded]}


def _demo_questions(rng: random.Random, split: str) -> Iterator[tuple[int, int]]:
    """DEMO_SIZES[split] (topic, question) draws of the split: the test split holds the combinations with
    (3 * topic + question) % 5 == 0, never seen in training. The caller draws from rng between them."""
    for _ in range(DEMO_SIZES[split]):
        while True:
            topic, question = rng.randrange(len(DEMO_TOPICS)), rng.randrange(len(DEMO_QUESTIONS))
            if ((3 * topic + question) % 5 == 0) == (split == "test"):
                break
        yield topic, question


def _demo_prompt(rng: random.Random, topic: int, question: int) -> str:
    subject, words = DEMO_TOPICS[topic]
    prompt = "\n\nHuman: " + DEMO_QUESTIONS[question].format(s=subject)
    if rng.random() < 0.25:  # a second turn about the same topic
        a, b = rng.sample(words.split(), 2)
        prompt += (ASSISTANT + " " + rng.choice(DEMO_FIRST_ANSWERS).format(a=a, b=b)
                   + "\n\nHuman: " + rng.choice(DEMO_FOLLOW_UPS))
    return prompt + ASSISTANT


def _demo_answer(rng: random.Random, topic: int, style: tuple[list[str], list[str]]) -> str:
    subject, words = DEMO_TOPICS[topic]
    a, b, c = rng.sample(words.split(), 3)
    text = rng.choice(style[0]) + " " + rng.choice(DEMO_BODIES).format(s=subject, a=a, b=b, c=c)
    if rng.random() < 0.8:
        text += " " + rng.choice(style[1])
    return " " + text  # hh-rlhf responses start with a space after "Assistant:"


def demo_tokenizer() -> Tokenizer:
    """A word-level tokenizer covering every word the demo generator can write (a few hundred)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    texts = ["Human: Assistant:"] + [s + " " + w for s, w in DEMO_TOPICS]
    texts += DEMO_QUESTIONS + DEMO_FIRST_ANSWERS + DEMO_FOLLOW_UPS + DEMO_BODIES
    texts += DEMO_POLITE[0] + DEMO_POLITE[1] + DEMO_RUDE[0] + DEMO_RUDE[1]
    words = set()
    for text in texts:
        text = re.sub(r"\{\w\}", " ", text)  # drop the template slots
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {w: i for i, w in enumerate(DEMO_SPECIAL + sorted(words))}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(DEMO_SPECIAL)
    return Tokenizer(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", config={"model_max_length": 256})
