"""Realistic inputs and demos for ``dspex demo`` (the reference signatures in ``signatures/``)."""

from __future__ import annotations

from typing import Any

__all__ = ["CLASSIFY_DEMOS", "QA_DEMOS", "QA_INSTRUCTIONS", "RAG_DEMOS", "inputs_for", "session_names"]

_SESSIONS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell", "cyberdyne",
             "soylent", "aperture")

QUESTIONS = (
    "Why is the sky blue?",
    "What is the capital of Australia?",
    "How many moons does Mars have?",
    "Who wrote 'Pride and Prejudice'?",
    "What does HTTP status code 429 mean?",
    "At what temperature does water boil at sea level in Fahrenheit?",
    "What is the difference between a process and a thread?",
    "Which planet has the shortest day?",
    "What year did the Berlin Wall fall?",
    "What is the time complexity of binary search?",
    "What gas do plants absorb during photosynthesis?",
    "How long does light from the Sun take to reach Earth?",
)

REVIEWS = (
    "The checkout flow is fast and the support team answered within minutes. Love it.",
    "Third outage this month and nobody from support replied to my ticket.",
    "The invoice arrived on the 3rd, as usual.",
    "Battery life is great, but the charger stopped working after a week.",
    "Honestly the best onboarding experience I've had with a SaaS product.",
    "The app crashes every time I try to export a report. Unusable.",
    "Delivery was on time and the package was intact.",
    "Pricing changed without notice and my plan now costs twice as much.",
    "The new dashboard is okay, nothing special.",
    "Setup took five minutes and everything just worked.",
)

ARTICLES = (
    "The city council approved a plan on Tuesday to convert three downtown parking garages into mixed-use "
    "buildings with affordable housing, ground-floor retail and bicycle storage. Supporters said the change "
    "would add roughly 400 homes within walking distance of transit, while opponents warned that visitors to "
    "the shopping district would struggle to find parking during the holidays. Construction is expected to "
    "start next spring and take about two years.",
    "Researchers reported a battery chemistry that replaces cobalt with iron and manganese, cutting material "
    "costs by about a third. Early cells kept 90 percent of their capacity after 2,000 charge cycles in the "
    "lab, but the team cautioned that energy density is still lower than in today's best lithium-ion cells "
    "and that manufacturing at scale remains unproven.",
    "After a two-week trial, the support team moved from email to a shared chat queue. Median first response "
    "time fell from four hours to twenty minutes, and customer satisfaction scores rose slightly. Agents said "
    "the queue made it easier to hand off conversations, but asked for better search across past chats.",
    "The quarterly report showed revenue up 12 percent year over year, driven by subscriptions in Europe. "
    "Hardware sales declined for the third quarter in a row. The company raised its full-year forecast and "
    "announced a share buyback, sending the stock up 6 percent in after-hours trading.",
)

ANALYSES = (
    ("Maria Lopez joined Northwind Labs in Berlin as chief technology officer on 4 March 2024, after eight years "
     "at Contoso.", ["Northwind Labs is a robotics start-up.", "Contoso is a cloud software company."]),
    ("The European Central Bank held interest rates steady on Thursday, citing easing inflation in France and "
     "Germany.", ["Inflation in the euro area fell to 2.4 percent in November."]),
    ("Apollo 11 landed on the Moon on 20 July 1969; Neil Armstrong and Buzz Aldrin walked on the surface while "
     "Michael Collins stayed in orbit.", ["NASA ran the Apollo program.", "Apollo 11 launched from Florida."]),
    ("Acme Corp recalled 12,000 kettles sold in Canada after reports of faulty thermostats.",
     ["Health Canada issued the recall notice.", "No injuries were reported."]),
)

QA_INSTRUCTIONS = ("Answer in one short sentence, as a support engineer would. Set confidence to a number "
                   "between 0 and 1.")

QA_DEMOS = [
    {"question": "What does HTTP 503 mean?", "answer": "The service is temporarily unavailable.", "confidence": 0.95},
    {"question": "What is the capital of Canada?", "answer": "Ottawa.", "confidence": 0.98},
    {"question": "How many bytes are in a kilobyte?", "answer": "1,000 (or 1,024 in binary usage).",
     "confidence": 0.8},
]

CLASSIFY_DEMOS = [
    {"text": "Great product, fast shipping!", "label": "positive", "confidence": 0.96},
    {"text": "It broke after two days.", "label": "negative", "confidence": 0.93},
    {"text": "The parcel arrived on Monday.", "label": "neutral", "confidence": 0.88},
]


# The reference programs (signatures/programs/) answer questions about the Veshan Isles corpus.
RAG_QUESTIONS = (
    "What is the capital of the Veshan Isles?",
    "Which island is known for sheep farming?",
    "How many people live on the Veshan Isles?",
    "What is the name of the volcano on Veshan Major?",
)

AGENT_QUESTIONS = (
    "How many years passed between the founding of Port Ellery and 2024?",
    "Which Veshan island is the largest, and what is its capital?",
)

RAG_DEMOS = [  # one demo for the RAG program's one predictor (ChainOfThought: reasoning, then response)
    {"context": ["Veshan Major | Veshan Major is the largest of the Veshan Isles. It holds the capital, Port Ellery."],
     "question": "Where is the capital of the Veshan Isles?",
     "reasoning": "The passage says Veshan Major holds the capital, Port Ellery.",
     "response": "Port Ellery, on Veshan Major."},
]


def session_names(count: int) -> list[str]:
    """``count`` distinct, readable session ids (``acme``, ``globex``, ..., ``acme-2``, ...)."""
    return [_SESSIONS[i % len(_SESSIONS)] + (f"-{i // len(_SESSIONS) + 1}" if i >= len(_SESSIONS) else "")
            for i in range(max(count, 1))]


def inputs_for(signature: str, i: int) -> dict[str, Any]:
    """The ``i``-th demo input for one of the reference signatures."""
    if signature == "qa":
        return {"question": QUESTIONS[i % len(QUESTIONS)]}
    if signature == "classify":
        return {"text": REVIEWS[i % len(REVIEWS)]}
    if signature == "summarize":
        return {"text": ARTICLES[i % len(ARTICLES)], "max_words": (25, 40, 60)[i % 3]}
    if signature == "complex_analysis":
        text, context = ANALYSES[i % len(ANALYSES)]
        return {"text": text, "context": list(context)}
    if signature == "rag":
        return {"question": RAG_QUESTIONS[i % len(RAG_QUESTIONS)]}
    if signature == "agent":
        return {"question": AGENT_QUESTIONS[i % len(AGENT_QUESTIONS)]}
    raise ValueError(f"no demo inputs for signature {signature!r}")
