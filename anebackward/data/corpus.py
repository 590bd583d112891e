"""The embedded default corpus: short, simple stories generated from a small
grammar written for this project (no text copied from anywhere).

The stories are deterministic for a given seed, use a small vocabulary and
repeat their structure, so a tiny byte-level model learns visible structure
(words, names carried through a story, punctuation) within a minute.
"""
import random

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Nora", "Finn"]
ANIMALS = ["cat", "dog", "bird", "frog", "rabbit", "duck", "fox", "bear", "mouse", "turtle"]
ADJS = ["little", "happy", "big", "small", "kind", "brave", "shy", "funny", "sleepy", "curious"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white"]
THINGS = ["ball", "kite", "box", "hat", "cup", "book", "boat", "drum", "flower", "apple"]
PLACES = ["park", "garden", "forest", "house", "river", "beach", "hill", "yard", "farm", "town"]
VERBS = ["play", "run", "jump", "sing", "dance", "swim", "read", "draw", "climb", "hide"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud", "surprised", "calm"]
TIMES = ["Once upon a time", "One day", "One sunny morning", "Long ago", "One evening"]


def _story(r):
    name, friend = r.sample(NAMES, 2)
    animal, adj, color = r.choice(ANIMALS), r.choice(ADJS), r.choice(COLORS)
    thing, place, verb = r.choice(THINGS), r.choice(PLACES), r.choice(VERBS)
    pron = r.choice(["he", "she"])
    poss = "his" if pron == "he" else "her"
    feel, feel2 = r.sample(FEELINGS, 2)
    s = [f"{r.choice(TIMES)}, there was a {adj} {animal} named {name}."]
    s.append(f"{name} liked to {verb} in the {place}.")
    s.append(r.choice([
        f"One day, {name} found a {color} {thing} near the {place}.",
        f"{name} had a {color} {thing} that {pron} loved very much.",
        f"In the {place}, {name} saw a {color} {thing} under a tree.",
    ]))
    s.append(r.choice([
        f"{name} met {poss} friend {friend} and they played with the {thing} all day.",
        f"The {thing} was lost, and {name} felt {feel}.",
        f"{friend} came by and asked, \"Can I {verb} with you?\"",
        f"{name} wanted to show the {thing} to {friend}.",
    ]))
    s.append(r.choice([
        f"\"Thank you, {friend}!\" said {name}.",
        f"{name} and {friend} were {feel2} together.",
        f"They went home and {name} felt {feel2}.",
        f"From that day on, {name} and {friend} were best friends.",
    ]))
    s.append(r.choice(["The end.", f"{name} smiled.", "And they lived happily ever after."]))
    return " ".join(s)


def default_corpus(n_stories=4000, seed=0):
    """A list of n_stories generated stories (deterministic for seed)."""
    r = random.Random(seed)
    return [_story(r) for _ in range(n_stories)]
