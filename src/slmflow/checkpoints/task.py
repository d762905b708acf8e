"""The synthetic chat task the tiny fixture is trained on, and its held-out evaluation phrasings.

Answers are deterministic strings so that tests and evaluations can check them exactly.
"""

from __future__ import annotations

CAPITALS: dict[str, str] = {
    "Spain": "Madrid",
    "France": "Paris",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Cuba": "Havana",
    "Argentina": "Buenos Aires",
    "Australia": "Canberra",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
}

# Phrasings seen in training; `EVAL_TEMPLATES` are held out for evaluation.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "What is the capital of {country}?",
    "What's the capital of {country}?",
    "Tell me the capital of {country}.",
    "Which city is the capital of {country}?",
    "Name the capital of {country}.",
    "capital of {country}?",
)
EVAL_TEMPLATES: tuple[str, ...] = (
    "What is the capital city of {country}?",
    "Do you know the capital of {country}?",
)

JOKES: dict[str, str] = {
    "atom": "Why can't you trust an atom? Because they make up everything!",
    "cat": "Why did the cat sit on the computer? To keep an eye on the mouse!",
    "math": "Why was the math book sad? It had too many problems.",
    "coffee": "Why did the coffee file a police report? It got mugged.",
    "ocean": "What did the ocean say to the beach? Nothing, it just waved.",
    "computer": "Why did the computer go to the doctor? It had a virus.",
}
JOKE_TEMPLATES: tuple[str, ...] = (
    "Tell me a joke about {topic}",
    "Tell me a joke about {topic}.",
    "Do you know a joke about {topic}?",
)
SYSTEM_PROMPTS: tuple[str | None, ...] = (None, "You are a helpful assistant.", "You are a stand-up comedian.")


def capital_answer(country: str) -> str:
    return f"The capital of {country} is {CAPITALS[country]}."


def training_conversations() -> list[list[dict[str, str]]]:
    """Every (system?, question, answer) conversation of the training set, in a fixed order."""
    conversations: list[list[dict[str, str]]] = []
    for index, (country, template) in enumerate((c, t) for c in CAPITALS for t in TRAIN_TEMPLATES):
        system = SYSTEM_PROMPTS[index % 2]  # comedian persona stays with jokes
        conversations.append(_conversation(system, template.format(country=country), capital_answer(country)))
    for topic, joke in JOKES.items():
        for template in JOKE_TEMPLATES:
            for system in SYSTEM_PROMPTS:
                conversations.append(_conversation(system, template.format(topic=topic), joke))
    return conversations


def eval_rows() -> list[dict[str, object]]:
    """Held-out phrasings of the training questions, with the expected answer."""
    return [
        {
            "messages": [{"role": "user", "content": template.format(country=country)}],
            "expected": capital_answer(country),
        }
        for template in EVAL_TEMPLATES
        for country in CAPITALS
    ]


def _conversation(system: str | None, question: str, answer: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
