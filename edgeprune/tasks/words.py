"""Word lists for the task templates, written for edgeprune.

Generators keep only the words that are a single token (after a space) for the tokenizer at hand,
so the lists are deliberately longer than any one tokenizer needs.
"""

FEMALE_NAMES = (
    "Mary", "Anna", "Sarah", "Emma", "Laura", "Lisa", "Kate", "Jane", "Rachel", "Linda", "Susan",
    "Karen", "Nancy", "Helen", "Amy", "Emily", "Alice", "Julia", "Rose", "Grace", "Claire", "Diana",
    "Maria", "Elizabeth", "Jennifer", "Jessica", "Michelle", "Stephanie", "Rebecca", "Barbara",
    "Patricia", "Catherine", "Victoria", "Natalie", "Sophie", "Lucy", "Ellen", "Ruth", "Carol",
    "Donna", "Sandra", "Ashley", "Hannah", "Megan", "Amanda", "Nicole", "Kelly", "Heather", "Joan",
    "Martha", "Eva", "Irene", "Olivia", "Chloe", "Lily", "Ann", "Beth", "Judy", "Paula", "Monica",
)

MALE_NAMES = (
    "John", "James", "Michael", "David", "Robert", "William", "Richard", "Thomas", "Mark", "Paul",
    "Steven", "Andrew", "Peter", "George", "Edward", "Daniel", "Kevin", "Brian", "Jason", "Eric",
    "Adam", "Ryan", "Jack", "Henry", "Frank", "Scott", "Tom", "Sam", "Ben", "Alex", "Luke",
    "Matthew", "Charles", "Joseph", "Christopher", "Anthony", "Patrick", "Simon", "Martin", "Carl",
    "Gary", "Larry", "Jeff", "Bill", "Joe", "Mike", "Dan", "Tim", "Tony", "Victor", "Oliver",
    "Harry", "Fred", "Kyle", "Sean", "Ian", "Justin", "Nathan", "Arthur", "Timmy",
)

PLACES = (
    "store", "park", "school", "garden", "station", "beach", "hospital", "office", "restaurant",
    "library", "market", "church", "house", "kitchen", "museum", "airport", "river", "cafe", "bank",
    "farm", "hotel", "theater", "mall", "lake", "gym", "bakery", "zoo", "harbor", "stadium",
)

# Each follows "a" in some template, so none starts with a vowel sound.
OBJECTS = (
    "drink", "book", "ring", "ball", "bag", "letter", "key", "pen", "bottle", "box", "card", "cake",
    "hat", "basket", "snack", "note", "phone", "cup", "camera", "computer", "necklace", "candle",
    "flower", "sandwich", "ticket", "map", "watch", "knife", "coin", "toy", "shirt", "pizza",
)

# Jobs that follow "a" in the pronoun templates: no vowel sounds, none strongly gender-typed.
JOBS = (
    "teacher", "lawyer", "writer", "pilot", "banker", "painter", "student", "doctor", "cook",
    "driver", "runner", "singer", "farmer", "baker", "journalist", "scientist", "musician",
    "manager", "programmer", "photographer", "designer", "chemist", "librarian", "carpenter",
)

# Things whose span of years the greater-than task asks about.
SPANS = (
    "war", "siege", "drought", "reign", "famine", "voyage", "strike", "rebellion", "occupation",
    "expedition", "festival", "conflict", "plague", "campaign", "dispute", "construction",
)
