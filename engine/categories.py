"""Categories: which detector class a description or a category word refers to.

"my grey cat" → ``cat``; "Alice's corgi" → ``dog``. Used to pick the right detection when a
concept is remembered and to add the scope's categories to the detector's vocabulary.
"""

from __future__ import annotations

import re

# Words people use for things the detector knows under another name.
SYNONYMS: dict[str, str] = {
    "kitty": "cat",
    "kitten": "cat",
    "tabby": "cat",
    "moggy": "cat",
    "puppy": "dog",
    "pup": "dog",
    "doggo": "dog",
    "doggy": "dog",
    "corgi": "dog",
    "labrador": "dog",
    "retriever": "dog",
    "poodle": "dog",
    "terrier": "dog",
    "beagle": "dog",
    "pug": "dog",
    "husky": "dog",
    "dachshund": "dog",
    "spaniel": "dog",
    "shepherd": "dog",
    "bulldog": "dog",
    "chihuahua": "dog",
    "man": "person",
    "woman": "person",
    "boy": "person",
    "girl": "person",
    "child": "person",
    "kid": "person",
    "baby": "person",
    "friend": "person",
    "mom": "person",
    "mum": "person",
    "dad": "person",
    "mother": "person",
    "father": "person",
    "brother": "person",
    "sister": "person",
    "wife": "person",
    "husband": "person",
    "son": "person",
    "daughter": "person",
    "grandma": "person",
    "grandpa": "person",
    "aunt": "person",
    "uncle": "person",
    "cousin": "person",
    "colleague": "person",
    "boss": "person",
    "me": "person",
    "myself": "person",
    "people": "person",
    "guy": "person",
    "partner": "person",
    "girlfriend": "person",
    "boyfriend": "person",
    "plushie": "plush toy",
    "plush": "plush toy",
    "teddy": "teddy bear",
    "stuffed": "plush toy",
    "sneakers": "sneaker",
    "trainer": "sneaker",
    "trainers": "sneaker",
    "shoe": "sneaker",
    "shoes": "sneaker",
    "boots": "boot",
    "glasses": "sunglasses",
    "shades": "sunglasses",
    "bike": "bicycle",
    "motorbike": "motorcycle",
    "auto": "car",
    "automobile": "car",
    "kettle": "teapot",
    "mug": "cup",
    "phone": "cell phone",
    "smartphone": "cell phone",
    "laptop": "laptop",
    "telly": "tv",
    "television": "tv",
    "sofa": "couch",
    "rucksack": "backpack",
    "bag": "handbag",
    "pony": "horse",
    "bunny": "rabbit",
}


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def category_from_text(text: str, vocabulary: list[str]) -> str:
    """The vocabulary class that ``text`` names, or "" when none does.

    English puts the head noun last ("a cat toy" is a toy), so the last match wins.
    """
    folded = text.casefold()
    known = {c.casefold(): c for c in vocabulary}
    best: tuple[int, str] | None = None
    for phrase, original in known.items():
        if " " in phrase:
            for match in re.finditer(r"(?<!\w)" + re.escape(phrase) + r"s?(?!\w)", folded):
                if best is None or match.end() > best[0]:
                    best = (match.end(), original)
    for match in re.finditer(r"[^\W\d_]+", folded):
        word = match.group()
        candidates = (word, _singular(word), SYNONYMS.get(word), SYNONYMS.get(_singular(word)))
        for candidate in candidates:
            if candidate and candidate in known and (best is None or match.end() >= best[0]):
                best = (match.end(), known[candidate])
                break
    return best[1] if best else ""


def same_category(label: str, category: str) -> bool:
    """Whether a detector label and a concept category name the same kind of thing."""
    if not label or not category:
        return False
    a, b = label.casefold(), category.casefold()
    a = SYNONYMS.get(a, a)
    b = SYNONYMS.get(b, b)
    toys = {"plush toy", "teddy bear", "toy", "stuffed animal"}
    return a == b or (a in toys and b in toys)
