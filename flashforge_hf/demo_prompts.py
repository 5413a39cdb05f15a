"""Built-in few-shot prompts of ``flashforge-hf demo``, written for this project (not taken from any data set).

Eight worked arithmetic word problems form the shared few-shot prefix; every question of the batch follows
it, so the whole batch shares the prefix. Each exemplar answer ends with "The answer is N." so the answers
can be checked (:func:`extract_answer`).
"""

from __future__ import annotations

import re

INSTRUCTION = "Solve each problem step by step, then finish with \"The answer is N.\""

EXEMPLARS = [
    ("A baker makes 4 trays of rolls with 12 rolls on each tray. How many rolls does she make?",
     "Each tray has 12 rolls and there are 4 trays, so 4 * 12 = 48 rolls. The answer is 48."),
    ("Tom has 35 marbles. He gives 9 to his sister and 6 to his friend. How many marbles does he have left?",
     "He gives away 9 + 6 = 15 marbles. 35 - 15 = 20 marbles are left. The answer is 20."),
    ("A train travels 60 kilometers every hour. How far does it travel in 3 hours?",
     "In one hour it travels 60 km, so in 3 hours it travels 3 * 60 = 180 km. The answer is 180."),
    ("A box holds 8 pencils. How many boxes are needed for 56 pencils?",
     "Each box holds 8 pencils, so 56 / 8 = 7 boxes are needed. The answer is 7."),
    ("Mia reads 15 pages on Monday and twice as many on Tuesday. How many pages does she read in the two days?",
     "On Tuesday she reads 2 * 15 = 30 pages. In total she reads 15 + 30 = 45 pages. The answer is 45."),
    ("A shirt costs $18 and a cap costs $7. How much do 2 shirts and 1 cap cost?",
     "Two shirts cost 2 * 18 = 36 dollars. Adding the cap gives 36 + 7 = 43 dollars. The answer is 43."),
    ("There are 24 students in a class. A third of them walk to school. How many students do not walk?",
     "A third of 24 is 24 / 3 = 8 students who walk. 24 - 8 = 16 students do not walk. The answer is 16."),
    ("A garden has 5 rows of 9 tulips. 13 tulips are picked. How many tulips remain?",
     "There are 5 * 9 = 45 tulips. After picking 13, 45 - 13 = 32 remain. The answer is 32."),
]

# (question, expected answer)
QUESTIONS = [
    ("A farmer has 7 pens with 6 sheep in each pen. How many sheep does he have?", 42),
    ("Lena had 50 stickers. She used 14 on Monday and 11 on Tuesday. How many stickers are left?", 25),
    ("A bus carries 40 people. How many people can 3 buses carry?", 120),
    ("A pizza is cut into 8 slices. How many slices are there in 6 pizzas?", 48),
    ("Sam saves $5 each week. How much has he saved after 9 weeks?", 45),
    ("A rope is 72 meters long. It is cut into 4 equal pieces. How long is each piece?", 18),
    ("A shop sells 23 apples in the morning and 19 in the afternoon. How many apples does it sell?", 42),
    ("Anna buys 3 books at $12 each and pays with a $50 bill. How much change does she get?", 14),
]


def few_shot_text(question: str) -> str:
    """The plain few-shot prompt: the instruction, ``Q: ...\\nA: ...`` blocks, then the question."""
    blocks = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS)
    return f"{INSTRUCTION}\n\n{blocks}Q: {question}\nA:"


def few_shot_messages(question: str) -> list[dict]:
    """The chat form: the instruction and exemplars as alternating turns, then the question."""
    messages = [{"role": "system", "content": INSTRUCTION}]
    for q, a in EXEMPLARS:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]


def extract_answer(text: str) -> str | None:
    """The number after "The answer is" (commas and a trailing period removed), else None."""
    match = re.search(r"[Tt]he answer is\s*\$?(-?[\d,]*\.?\d+)", text)
    return match.group(1).replace(",", "").rstrip(".") if match else None
