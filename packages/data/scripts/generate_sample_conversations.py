"""Write the bundled sample conversations, deterministically.

    python packages/data/scripts/generate_sample_conversations.py

Output: ``src/torchspec/data/samples/sample_conversations.jsonl``, one ``{"conversations": [...]}`` record
per line in OpenAI format. The topics are small, templated tasks (arithmetic, counting, spelling, simple
facts, lists, comparisons) so a tiny language model can learn them: repetitive, but varied in numbers,
words and phrasing. About a third of the conversations carry ``reasoning_content`` on assistant turns and
about two fifths open with a system prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NUM_CONVERSATIONS = 480
SEED = 20240611
OUTPUT = Path(__file__).resolve().parents[1] / "src/torchspec/data/samples/sample_conversations.jsonl"

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a patient tutor who answers in short, clear sentences.",
    "You are a friendly assistant for children learning numbers and words.",
    "Answer every question correctly and briefly.",
    "You are a careful assistant. Check your work before you answer.",
]

WORDS = [
    "apple",
    "river",
    "garden",
    "window",
    "yellow",
    "pencil",
    "rabbit",
    "summer",
    "castle",
    "bridge",
    "orange",
    "planet",
    "forest",
    "button",
    "candle",
    "dragon",
    "silver",
    "winter",
    "ladder",
    "basket",
    "mirror",
    "rocket",
    "pocket",
    "finger",
    "turtle",
    "jacket",
    "guitar",
    "island",
    "market",
    "camera",
    "school",
    "doctor",
    "flower",
    "spider",
    "tomato",
    "butter",
    "monkey",
    "ticket",
    "violin",
    "kitten",
    "cloud",
    "house",
    "train",
    "water",
    "music",
    "table",
    "chair",
    "bread",
    "horse",
    "light",
    "green",
    "stone",
    "paper",
    "smile",
    "beach",
    "clock",
    "dream",
    "heart",
    "money",
    "ocean",
]

CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"],
    "animals": ["cat", "dog", "horse", "rabbit", "lion", "tiger", "bear", "mouse", "sheep", "goat"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
    "vegetables": ["carrot", "potato", "onion", "pea", "bean", "tomato", "cabbage", "pepper", "lettuce", "corn"],
    "tools": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "ladder", "knife", "brush", "ruler"],
    "vehicles": ["car", "bus", "train", "bicycle", "truck", "boat", "plane", "scooter", "tram", "van"],
}

ANIMAL_SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "horse": "neigh",
    "lion": "roar",
    "owl": "hoot",
    "pig": "oink",
    "frog": "croak",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "up": "down",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "young": "old",
    "hard": "soft",
    "high": "low",
}
THINGS_COLORS = {
    "the sky on a clear day": "blue",
    "grass": "green",
    "snow": "white",
    "a ripe banana": "yellow",
    "coal": "black",
    "a ripe strawberry": "red",
    "an orange": "orange",
    "milk": "white",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Nora", "Max", "Ella"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "coins", "stamps", "cards", "shells"]


def arithmetic(rng: random.Random):
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(["plus", "minus", "times"])
    if kind == "minus" and b > a:
        a, b = b, a
    if kind == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    result = {"plus": a + b, "minus": a - b, "times": a * b}[kind]
    symbol = {"plus": "+", "minus": "-", "times": "*"}[kind]
    question = rng.choice(
        [f"What is {a} {kind} {b}?", f"Can you compute {a} {symbol} {b}?", f"How much is {a} {kind} {b}?"]
    )
    answer = rng.choice([f"{a} {kind} {b} is {result}.", f"The answer is {result}.", f"{a} {symbol} {b} = {result}."])
    if kind == "times":
        steps = f"{a} times {b} means adding {a} to itself {b} times. " + f"{a} * {b} = {result}."
    elif kind == "plus":
        tens = (b // 10) * 10
        steps = (
            f"First add {tens} to {a} to get {a + tens}. Then add {b - tens} to get {result}."
            if tens
            else f"{a} + {b} = {result}."
        )
    else:
        steps = f"Take {b} away from {a}. {a} - {b} = {result}."
    return question, answer, steps


def word_problem(rng: random.Random):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(1, 15)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        answer = f"{name} has {a + b} {item} now, because {a} + {b} = {a + b}."
        steps = f"{name} starts with {a} {item}. Getting {b} more means adding: {a} + {b} = {a + b}."
    else:
        a, b = max(a, b) + 1, min(a, b)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        answer = f"{name} has {a - b} {item} left, because {a} - {b} = {a - b}."
        steps = f"{name} starts with {a} {item}. Giving away {b} means subtracting: {a} - {b} = {a - b}."
    return question, answer, steps


def counting(rng: random.Random):
    start = rng.randint(1, 30)
    length = rng.randint(4, 10)
    if rng.random() < 0.7:
        numbers = list(range(start, start + length))
        question = rng.choice(
            [f"Count from {numbers[0]} to {numbers[-1]}.", f"Please count up from {numbers[0]} to {numbers[-1]}."]
        )
    else:
        numbers = list(range(start + length, start, -1))
        question = f"Count down from {numbers[0]} to {numbers[-1]}."
    answer = ", ".join(str(n) for n in numbers) + "."
    steps = f"I start at {numbers[0]} and move one step at a time until I reach {numbers[-1]}."
    return question, answer, steps


def spelling(rng: random.Random):
    word = rng.choice(WORDS)
    kind = rng.choice(["spell", "length", "first", "reverse"])
    letters = "-".join(word.upper())
    if kind == "spell":
        question = rng.choice([f"How do you spell {word}?", f"Spell the word {word}, please."])
        answer = f"{word} is spelled {letters}."
        steps = f"I write each letter of {word} in order: {letters}."
    elif kind == "length":
        question = f"How many letters are in the word {word}?"
        answer = f"The word {word} has {len(word)} letters."
        steps = f"The letters are {letters}. Counting them gives {len(word)}."
    elif kind == "first":
        question = f"What is the first letter of {word}?"
        answer = f"The first letter of {word} is {word[0].upper()}."
        steps = f"{word} starts with {word[0].upper()}."
    else:
        question = f"Write the word {word} backwards."
        answer = f"{word} backwards is {word[::-1]}."
        steps = f"The letters of {word} are {letters}. Reading them from the end gives {'-'.join(word[::-1].upper())}."
    return question, answer, steps


def facts(rng: random.Random):
    kind = rng.choice(["sound", "opposite", "color", "day", "month"])
    if kind == "sound":
        animal = rng.choice(sorted(ANIMAL_SOUNDS))
        return (
            f"What sound does a {animal} make?",
            f"A {animal} says {ANIMAL_SOUNDS[animal]}.",
            f"The {animal} is known for the sound {ANIMAL_SOUNDS[animal]}.",
        )
    if kind == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        return (
            f"What is the opposite of {word}?",
            f"The opposite of {word} is {OPPOSITES[word]}.",
            f"{word} and {OPPOSITES[word]} mean opposite things.",
        )
    if kind == "color":
        thing = rng.choice(sorted(THINGS_COLORS))
        return (
            f"What color is {thing}?",
            f"{thing[0].upper() + thing[1:]} is {THINGS_COLORS[thing]}.",
            f"Most people see {thing} as {THINGS_COLORS[thing]}.",
        )
    if kind == "day":
        i = rng.randrange(7)
        return (
            f"What day comes after {DAYS[i]}?",
            f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}.",
            f"The week goes {', '.join(DAYS)}. After {DAYS[i]} is {DAYS[(i + 1) % 7]}.",
        )
    i = rng.randrange(12)
    return (
        f"Which month comes after {MONTHS[i]}?",
        f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}.",
        f"Month number {i + 1} is {MONTHS[i]}, so the next one is {MONTHS[(i + 1) % 12]}.",
    )


def lists(rng: random.Random):
    category = rng.choice(sorted(CATEGORIES))
    count = rng.randint(3, 6)
    chosen = rng.sample(CATEGORIES[category], count)
    question = rng.choice(
        [f"Name {count} {category}.", f"Can you list {count} {category}?", f"Give me a list of {count} {category}."]
    )
    if rng.random() < 0.5:
        answer = f"Here are {count} {category}: " + ", ".join(chosen[:-1]) + f" and {chosen[-1]}."
    else:
        answer = "\n".join(f"{i + 1}. {item}" for i, item in enumerate(chosen))
    steps = f"I pick {count} different {category} and list each one once."
    return question, answer, steps


def comparison(rng: random.Random):
    a, b = rng.sample(range(1, 100), 2)
    kind = rng.choice(["bigger", "smaller", "parity"])
    if kind == "parity":
        parity = "even" if a % 2 == 0 else "odd"
        return (
            f"Is {a} even or odd?",
            f"{a} is {parity}.",
            f"{a} divided by 2 leaves a remainder of {a % 2}, so it is {parity}.",
        )
    pick = max(a, b) if kind == "bigger" else min(a, b)
    return (
        f"Which is {kind}, {a} or {b}?",
        f"{pick} is {kind}.",
        f"Compare {a} and {b}: {max(a, b)} is more than {min(a, b)}, so the {kind} one is {pick}.",
    )


TOPICS = [arithmetic, word_problem, counting, spelling, facts, lists, comparison]
FOLLOW_UPS = ["Thanks! ", "Great. ", "Okay. ", "Nice. ", "", "", "Next one: ", "One more question. "]


def conversation(rng: random.Random) -> list[dict]:
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    with_reasoning = rng.random() < 0.35
    for turn in range(rng.randint(3, 6)):
        question, answer, steps = rng.choice(TOPICS)(rng)
        prefix = rng.choice(FOLLOW_UPS) if turn else ""
        messages.append({"role": "user", "content": prefix + question})
        reply = {"role": "assistant", "content": answer}
        if with_reasoning:
            reply["reasoning_content"] = steps
        messages.append(reply)
    return messages


def main() -> None:
    rng = random.Random(SEED)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    with OUTPUT.open("w", encoding="utf-8", newline="\n") as out:
        for _ in range(NUM_CONVERSATIONS):
            out.write(json.dumps({"conversations": conversation(rng)}, ensure_ascii=False) + "\n")
    print(f"wrote {NUM_CONVERSATIONS} conversations to {OUTPUT} ({OUTPUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
