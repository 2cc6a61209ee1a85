"""The sample English text: the demo tokenizer is trained on it, and verification reads a window
of it when no text is given (so the server needs it, not the demo's model making)."""

_EMBEDDED_TEXT = """\
The harbour town wakes slowly in winter. Before the sun clears the hills, the bakers have already lit their \
ovens, and the smell of bread drifts down the narrow streets toward the water. Fishing boats knock gently \
against the wooden pier while their crews check nets, coil ropes and argue about the weather. Most mornings \
the sea is grey and calm, but everyone remembers the storm of the old year, when waves climbed over the \
harbour wall and the lighthouse keeper stayed awake for three nights in a row.

The lighthouse stands on a rock at the end of a long causeway. Its keeper, a quiet woman named Ada, keeps a \
notebook in which she writes down the wind, the temperature, the height of the tide and the names of the ships \
that pass. She has done this for twenty years. When children from the school visit, she shows them how the \
great lens turns, how the lamp is cleaned, and how a single flame can be seen from thirty kilometres away. \
"Light travels in straight lines," she tells them, "but people do not. That is why we need a lighthouse."

In the spring the fields above the town turn green again. Farmers plant potatoes, beans and barley, and the \
first lambs appear in the meadows. A small river runs through the valley, and in the evenings people walk \
along its banks to watch the swallows return. The river is cold and clear; you can count the stones on its bed \
and, if you are patient, see a trout resting in the shadow of a rock.

Cooking in the town is simple and generous. A typical supper might be fish soup with potatoes, onions and a \
little cream, followed by an apple cake. To make the soup, you first soften the onions in butter over a low \
heat. Then you add the potatoes, cut into small cubes, and enough water or stock to cover them. After twenty \
minutes you add the fish, which needs only a few minutes to cook. A spoonful of cream, some salt and pepper, \
and a handful of chopped parsley finish the dish. Bread is always on the table, and nobody leaves hungry.

Science begins with careful observation. A scientist asks a question, makes a guess about the answer, and \
then designs an experiment to test that guess. If the results agree with the prediction, the idea gains \
support; if they do not, the idea must be changed or abandoned. Over time, many small experiments build a \
picture of how the world works. This picture is never complete, and good scientists are always ready to learn \
that they were wrong.

Computers follow instructions written by people. A program is a list of steps: read a number, add it to a \
total, repeat until there are no numbers left, then print the result. Modern programs can be very large, with \
millions of lines, but they are still made of small, precise steps. When a program fails, the programmer reads \
the error message, forms a theory about the cause, changes the code and tries again. Patience matters more \
than cleverness.

Language models are programs that predict the next word in a piece of text. They learn by reading a great \
deal of writing and adjusting millions or billions of numbers, called weights, so that their predictions \
improve. A large model needs a lot of memory, so engineers look for ways to make it smaller without losing too \
much accuracy. One method removes whole rows and columns from the weight matrices after rotating them, so that \
the least important directions can be cut away. Another stores each number with fewer bits. Both methods \
trade a little quality for speed and size.

On Saturdays there is a market in the square. Farmers sell eggs, cheese, honey and vegetables; a man from the \
next village sells knives and scissors, and sharpens them while you wait. Children buy sweets and watch the \
musicians who play near the fountain. At noon the church bell rings twelve times, and the stall holders begin \
to pack their baskets. By one o'clock the square is empty again, except for the pigeons looking for crumbs.

The library is the oldest building in the town. Its shelves hold books about history, travel, gardening, \
mathematics and the sea. The librarian, Mr. Olsen, believes that every question deserves an answer, even if \
the answer is "nobody knows yet". He keeps a list of questions that visitors have asked: Why is the sky blue? \
How far away is the moon? Who built the first bridge over the river? How do birds find their way home? Some of \
these questions took him weeks to answer, and some are still open.

Autumn brings wind and rain. The leaves of the chestnut trees turn yellow and brown, and the boats stay in the \
harbour more often. People repair roofs, stack firewood and store apples in cool cellars. In the long evenings \
they read, play cards or tell stories about the past: the year the river froze, the summer of the great fire, \
the day a whale swam into the bay. The stories change a little every time they are told, but nobody minds. A \
good story, like a good loaf of bread, is meant to be shared.

Numbers appear everywhere in daily life. A recipe asks for two eggs and three hundred grams of flour; a train \
leaves at seven fifteen; a book has two hundred and forty pages. Counting, measuring and comparing are among \
the oldest skills people have. The numbers 1, 2, 3, 4, 5, 6, 7, 8, 9 and 0 are enough to write any whole \
number, and with a decimal point, such as 3.14 or 0.25, we can write fractions too.

When night falls, the lighthouse begins to turn. Its beam sweeps across the water once every ten seconds, and \
the sailors far out at sea count the flashes to know where they are. Ada climbs the stairs one last time, \
checks the lamp, and writes a final line in her notebook: wind from the west, sea calm, all ships safe.
"""


def embedded_text() -> str:
    """The sample English text (~5.6 KB) the tokenizer is trained on; also a default text window."""
    return _EMBEDDED_TEXT
