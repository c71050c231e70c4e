"""The model-free `rules` backend: a description from the code itself, a behaviour-changing AST mutant.

CodePMP asks a strong code LLM to summarise a snippet into a description, then a strong LLM writes the
chosen response and a weak LLM the rejected one. Here the description is assembled from the docstring,
the signature, the comments and a few facts read off the AST; the chosen response is the original
snippet and the rejected one a mutant with one small bug.

Formatting: the rejected response is the chosen text with *only the mutated node's source span*
replaced (an operator token, a literal, a name, a condition, or the lines of one statement). Everything
else -- comments, quotes, blank lines, line breaks -- is byte-identical, so formatting can never be the
tell between chosen and rejected (unparsing both would also be fair, but would throw the comments
away). Every textual edit is verified: the mutant must parse to exactly the intended mutated AST, its
`ast.unparse` must differ from the original's, and it must compile.
"""

from __future__ import annotations

import ast
import bisect
import copy
import io
import random
import time
import re
import tokenize
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

MUTATION_KINDS = ("operator_swap", "off_by_one", "drop_statement", "wrong_variable", "negate_condition")
FUNCTION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef)

# ---------------------------------------------------------------------------------------------------
# Description


# Imperative verbs that open docstrings ("Return the ..."): conjugated into "that returns the ...".
DOC_VERBS = frozenset("""
    accept access acquire add adjust allocate append apply assert assign attach build calculate call
    cancel check clean clear close collect combine compare compile compute configure connect construct
    convert copy count create decode decorate define delete detect determine disable display dispatch
    do download drop dump emit enable encode ensure escape evaluate execute expand export extract fetch
    fill filter find finish fix flatten flush format generate get give handle hash import increment
    initialise initialize insert install invoke iterate join keep load lock log look make map mark
    match merge move normalise normalize notify open pack pad parse patch perform pop populate prepare
    print process produce push put quote raise read receive record reduce register release reload
    remove rename render replace report reset resolve restore retrieve return reverse run save scan
    search select send serialize set setup show skip sort split start stop store strip substitute
    swap take tell test transform translate traverse truncate try turn unlock unpack unquote unregister
    update upload use validate verify visit wait walk wrap write yield
""".split())
MAX_COMMENT_CHARS = 300
PRAGMA_COMMENT = re.compile(r"^(noqa|type:|pylint:|pragma|fmt:|isort:|mypy:|pyright:|-\*-|!)", re.IGNORECASE)


@dataclass(frozen=True)
class DescribeConfig:
    docstring: str = "first"  # "first": the first paragraph; "all": the whole cleaned docstring
    max_comments: int = 6
    max_calls: int = 6
    min_comment_words: int = 4  # comments alone count as content when they have this many words
    min_name_words: int = 3  # a name this descriptive counts as content, with one fact about the body

    def __post_init__(self):
        if self.docstring not in ("first", "all"):
            raise ValueError(f"docstring mode must be 'first' or 'all', got {self.docstring!r}")


def describe(code: str, name: str | None = None, config: DescribeConfig = DescribeConfig()) -> str | None:
    """An instruction asking for `code`, or None if the code gives too little to describe.

    Content means a docstring, comments of at least `min_comment_words` words, two facts about the body
    (what it returns, yields, raises, calls or stores), or one fact and a descriptive name of at least
    `min_name_words` words (`test_set_type_on_other_header`): a bare signature is not a description.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], FUNCTION_NODES + (ast.ClassDef,)):
        return None
    node = tree.body[0]
    owner = name.split(".")[0] if name and "." in name else None
    docstring = _docstring_text(node, config.docstring)
    comments = code_comments(code, config.max_comments)
    facts = body_facts(node, config.max_calls)
    comment_words = sum(len(c.split()) for c in comments)
    name_words = _name_words(node.name)
    descriptive_name = len(name_words) >= config.min_name_words and len(facts) >= 1
    if not docstring and comment_words < config.min_comment_words and len(facts) < 2 and not descriptive_name:
        return None
    paragraphs = [_headline(node, owner, docstring)]
    if facts:
        paragraphs.append(" ".join(facts))
    if comments:
        paragraphs.append("Implementation notes: " + "; ".join(comments) + ".")
    return "\n\n".join(paragraphs)


def signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
        return f"{node.name}({', '.join(bases)})" if bases else node.name
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{node.name}({ast.unparse(node.args)}){returns}"


def _headline(node: ast.AST, owner: str | None, docstring: str) -> str:
    if isinstance(node, ast.ClassDef):
        what = "a Python class"
    elif owner:
        what = f"a Python {'async ' if isinstance(node, ast.AsyncFunctionDef) else ''}method"
    else:
        what = f"{'an async' if isinstance(node, ast.AsyncFunctionDef) else 'a'} Python function"
    decorators = [f"`@{ast.unparse(d)}`" for d in node.decorator_list]
    head = f"Write {what} `{signature(node)}`"
    if owner:
        head += f" of the class `{owner}`"
    if decorators:
        head += f", decorated with {_join(decorators)},"
    if not docstring and node.name.lower().startswith("test") and _name_words(node.name):
        # unittest/pytest names state what they check: test_read1_bounded -> "tests read1 bounded".
        return f"{head} that tests {' '.join(_name_words(node.name))}."
    if not docstring:
        return head.rstrip(",") + "."
    clause = _as_clause(docstring)
    if clause is not None:
        return f"{head} that {clause}"
    return f"{head.rstrip(',')}. {_sentence(docstring)}"


def _name_words(name: str) -> list[str]:
    """Words of a snake_case or CamelCase name, without a leading `test`."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).replace("_", " ")
    words = spaced.lower().split()
    return words[1:] if words[:1] == ["test"] else words


def _docstring_text(node: ast.AST, mode: str) -> str:
    raw = ast.get_docstring(node, clean=True)
    if not raw or not raw.strip():
        return ""
    if mode == "all":
        return raw.strip()
    first = re.split(r"\n\s*\n", raw.strip(), maxsplit=1)[0]
    return " ".join(first.split())


def _as_clause(docstring: str) -> str | None:
    """'Return the sum.' -> 'returns the sum.'; None when the docstring does not open with a verb."""
    match = re.match(r"([A-Za-z]+)\b(.*)", docstring, re.DOTALL)
    if not match:
        return None
    word, rest = match.group(1), match.group(2)
    lower = word.lower()
    if lower in DOC_VERBS:
        verb = _third_person(lower)
    elif lower.endswith("s") and (lower[:-1] in DOC_VERBS or (lower.endswith("es") and lower[:-2] in DOC_VERBS)
                                  or (lower.endswith("ies") and lower[:-3] + "y" in DOC_VERBS)):
        verb = lower
    else:
        return None
    return _sentence(verb + rest)


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "x", "z", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?", ":")) else text + "."


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def code_comments(code: str, limit: int) -> list[str]:
    """Up to `limit` distinct prose comments; pragmas and commented-out code are skipped.

    Consecutive full-line comments are one comment (a sentence often wraps over several lines).
    """
    blocks: list[list[str]] = []
    last_line = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = " ".join(tok.string.lstrip("#").split())
            if not text or PRAGMA_COMMENT.match(text) or _is_code(text):
                last_line = -2
                continue
            full_line = tok.line.lstrip().startswith("#")
            if full_line and tok.start[0] == last_line + 1 and blocks:
                blocks[-1].append(text)
            else:
                blocks.append([text])
            last_line = tok.start[0] if full_line else -2
    except (tokenize.TokenError, SyntaxError):
        pass  # keep the comments read before the tokenizer gave up
    found: list[str] = []
    for block in blocks:
        text = " ".join(block).rstrip(".")
        if len(text) > MAX_COMMENT_CHARS:
            text = text[:MAX_COMMENT_CHARS].rsplit(" ", 1)[0] + " ..."
        if len(text.split()) >= 2 and text not in found:
            found.append(text)
        if len(found) == limit:
            break
    return found


def _is_code(text: str) -> bool:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return False
    # "x = 1", "foo(bar)", "return x": parse and contain a non-name node. Prose rarely parses at all.
    return any(not isinstance(n, (ast.Module, ast.Expr, ast.Name, ast.Load)) for n in ast.walk(tree))


def body_facts(node: ast.AST, max_calls: int) -> list[str]:
    """Sentences about the body's observable behaviour, read off the AST."""
    if isinstance(node, ast.ClassDef):
        fields = [ast.unparse(s.target) for s in node.body if isinstance(s, ast.AnnAssign)]
        fields += [ast.unparse(t) for s in node.body if isinstance(s, ast.Assign) for t in s.targets]
        return [f"It defines {_join([f'`{f}`' for f in fields[:8]])}."] if fields else []
    own = list(_walk_own_scope(node))
    facts = []
    if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in own):
        facts.append("It is a generator.")
    elif any(isinstance(n, ast.Return) and n.value is not None for n in own):
        returns = f" of type `{ast.unparse(node.returns)}`" if node.returns is not None else ""
        facts.append(f"It returns a value{returns}.")
    raised = _unique(_exception_name(n.exc) for n in own if isinstance(n, ast.Raise) and n.exc is not None)
    if raised:
        facts.append(f"It raises {_join([f'`{r}`' for r in raised])}.")
    stored = _unique(ast.unparse(t) for n in own if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                     for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                     for t in ([t] if not isinstance(t, ast.Tuple) else t.elts)
                     if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name))
    if stored:
        facts.append(f"It sets {_join([f'`{a}`' for a in stored[:max_calls]])}.")
    calls = _unique(_call_name(n.func) for n in own if isinstance(n, ast.Call))
    if node.name in calls:
        facts.append("It is recursive.")
    calls = [c for c in calls if c != node.name and c not in raised][:max_calls]
    if calls:
        facts.append(f"It calls {_join([f'`{c}`' for c in calls])}.")
    return facts


def _walk_own_scope(node: ast.AST) -> Iterator[ast.AST]:
    """Nodes of a function's body, not descending into nested functions, lambdas and classes."""
    stack = list(reversed(node.body))
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        stack.extend(reversed(list(ast.iter_child_nodes(current))))


def _exception_name(exc: ast.AST) -> str | None:
    target = exc.func if isinstance(exc, ast.Call) else exc
    return _call_name(target)


def _call_name(func: ast.AST) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        base = _call_name(func.value)
        return f"{base}.{func.attr}" if base else None
    return None


def _unique(items) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


# ---------------------------------------------------------------------------------------------------
# Mutation


@dataclass(frozen=True)
class Mutation:
    kind: str
    detail: str  # e.g. "`+` -> `-`"
    line: int  # 1-based, in the snippet
    code: str  # the mutant


@dataclass
class _Site:
    """One candidate mutation: text edits on the snippet and the same change on a copy of its AST."""

    detail: str
    line: int
    edits: list[tuple[int, int, str]]  # (start, end, replacement), character offsets
    node_index: int  # index of the node to change in list(ast.walk(tree))
    apply: Callable[[ast.AST], None]  # mutates that node in the copy


class _Source:
    """A parsed snippet with maps from AST positions (1-based line, UTF-8 byte column) to str offsets."""

    def __init__(self, code: str):
        self.code = code
        self.tree = ast.parse(code)
        self.nodes = list(ast.walk(self.tree))
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.lines = [line + "\n" for line in code.split("\n")]
        self.line_starts = [0]
        for line in self.lines:
            self.line_starts.append(self.line_starts[-1] + len(line))
        self._tokens: list[tokenize.TokenInfo] | None = None
        self._token_starts: list[int] = []

    def offset(self, line: int, col_bytes: int) -> int:
        text = self.lines[line - 1]
        return self.line_starts[line - 1] + len(text.encode()[:col_bytes].decode(errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def text(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.code[start:end]

    def tokens_between(self, start: int, end: int) -> list[tuple[int, int, str]]:
        """Significant tokens (no brackets, comments, newlines) fully inside [start, end)."""
        if self._tokens is None:
            self._tokens = list(tokenize.generate_tokens(io.StringIO(self.code).readline))
            self._token_starts = [self.line_starts[t.start[0] - 1] + t.start[1] for t in self._tokens]
        found = []
        for i in range(bisect.bisect_left(self._token_starts, start), len(self._tokens)):
            tok, tok_start = self._tokens[i], self._token_starts[i]
            tok_end = self.line_starts[tok.end[0] - 1] + tok.end[1]
            if tok_end > end:
                break
            if tok.type in (tokenize.OP, tokenize.NAME) and tok.string not in ("(", ")"):
                found.append((tok_start, tok_end, tok.string))
        return found


def mutate(code: str, *, seed: int, key: str, kinds: tuple[str, ...] = MUTATION_KINDS,
           max_tries: int = 12) -> Mutation | None:
    """A behaviour-changing mutant of the single definition in `code`, or None if none is found.

    Deterministic in (seed, key): kinds are tried in an order shuffled by that pair, sites within a
    kind too, and the first site whose edit verifies wins.
    """
    unknown = set(kinds) - set(MUTATION_KINDS)
    if unknown:
        raise ValueError(f"unknown mutation kinds {sorted(unknown)}; known: {MUTATION_KINDS}")
    try:
        source = _Source(code)
    except (SyntaxError, ValueError):
        return None
    if len(source.tree.body) != 1 or not isinstance(source.tree.body[0], FUNCTION_NODES + (ast.ClassDef,)):
        return None
    rng = random.Random(f"{seed}:{key}")
    order = list(kinds)
    rng.shuffle(order)
    original = ast.unparse(source.tree)
    for kind in order:
        try:
            sites = list(SITE_FINDERS[kind](source, rng))
        except (tokenize.TokenError, SyntaxError):
            continue
        rng.shuffle(sites)
        for site in sites[:max_tries]:
            mutant = _try_site(source, site, original)
            if mutant is not None:
                return Mutation(kind, site.detail, site.line, mutant)
    return None


def _try_site(source: _Source, site: _Site, original: str) -> str | None:
    mutant = source.code
    for start, end, replacement in sorted(site.edits, reverse=True):
        mutant = mutant[:start] + replacement + mutant[end:]
    expected = copy.deepcopy(source.tree)
    site.apply(list(ast.walk(expected))[site.node_index])
    try:
        tree = ast.parse(mutant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. `x is 1` after an off-by-one on `x is 0`
            compile(mutant, "<mutant>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    # The text edit must be exactly the intended AST change (precedence, f-strings, line layout).
    if ast.dump(tree) != ast.dump(expected) or ast.unparse(tree) == original:
        return None
    return mutant


def _body_nodes(source: _Source) -> Iterator[ast.AST]:
    """Nodes of the definition's statements, without its docstring, decorators, arguments or annotations."""
    definition = source.tree.body[0]
    for stmt in _statements(definition):
        yield from ast.walk(stmt)


def _statements(definition: ast.AST) -> list[ast.stmt]:
    body = definition.body
    if body and _is_docstring(body[0]):
        body = body[1:]
    return body


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


# operator_swap -------------------------------------------------------------------------------------

BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mod,
               ast.Mod: ast.FloorDiv, ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr,
               ast.BitOr: ast.BitAnd}
CMP_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BOOL_SWAPS = {ast.And: ast.Or, ast.Or: ast.And}
SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.Lt: "<", ast.LtE: "<=",
           ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not",
           ast.In: "in", ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}


def _operator_sites(source: _Source, rng: random.Random) -> Iterator[_Site]:
    for node in _body_nodes(source):
        if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            if isinstance(node.op, ast.Mod) and isinstance(node.left, (ast.Constant, ast.JoinedStr)):
                continue  # "%s" % x is formatting, not arithmetic: a swap there is no plausible bug
            yield from _op_site(source, node, [(node.left, node.right)], type(node.op), BINOP_SWAPS,
                                lambda n, new: setattr(n, "op", new()))
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAPS:
            yield from _op_site(source, node, [(node.target, node.value)], type(node.op), BINOP_SWAPS,
                                lambda n, new: setattr(n, "op", new()), suffix="=")
        elif isinstance(node, ast.BoolOp):
            pairs = list(zip(node.values, node.values[1:]))
            yield from _op_site(source, node, pairs, type(node.op), BOOL_SWAPS,
                                lambda n, new: setattr(n, "op", new()))
        elif isinstance(node, ast.Compare):
            operands = [node.left] + node.comparators
            for i, op in enumerate(node.ops):
                if type(op) in CMP_SWAPS:
                    yield from _op_site(source, node, [(operands[i], operands[i + 1])], type(op), CMP_SWAPS,
                                        lambda n, new, i=i: n.ops.__setitem__(i, new()))


def _op_site(source, node, operand_pairs, op, swaps, apply, suffix="") -> Iterator[_Site]:
    """Edits replacing the operator token(s) between each pair of operands; nothing if one is not found."""
    new = swaps[op]
    old_text, new_text = SYMBOLS[op] + suffix, SYMBOLS[new] + suffix
    edits = []
    for left, right in operand_pairs:
        tokens = source.tokens_between(source.span(left)[1], source.span(right)[0])
        if " ".join(t[2] for t in tokens) != old_text:
            return
        edits.append((tokens[0][0], tokens[-1][1], new_text))
    yield _Site(f"`{old_text}` -> `{new_text}`", node.lineno, edits, source.index[id(node)],
                lambda n: apply(n, new))


# off_by_one ----------------------------------------------------------------------------------------

ATOMS = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant)


def _off_by_one_sites(source: _Source, rng: random.Random) -> Iterator[_Site]:
    for node in _body_nodes(source):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            # Going below zero would print "-1", which parses as a unary minus, not a literal.
            new = node.value + (1 if node.value == 0 or rng.random() < 0.5 else -1)
            start, end = source.span(node)
            yield _Site(f"{source.code[start:end]} -> {new}", node.lineno, [(start, end, str(new))],
                        source.index[id(node)], lambda n, new=new: setattr(n, "value", new))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
              and 1 <= len(node.args) <= 3 and not node.keywords
              and not any(isinstance(a, ast.Starred) for a in node.args)):
            position = 0 if len(node.args) == 1 else rng.randrange(2)
            yield _range_site(source, node, position, rng.choice((ast.Add, ast.Sub)))


def _range_site(source: _Source, call: ast.Call, position: int, op: type) -> _Site:
    arg = call.args[position]
    start, end = source.span(arg)
    text = source.code[start:end]
    if not isinstance(arg, ATOMS):
        text = f"({text})"
    bound = "stop" if position == len(call.args) - 1 or len(call.args) == 1 else "start"
    symbol = SYMBOLS[op]

    def apply(n: ast.Call) -> None:
        n.args[position] = ast.BinOp(n.args[position], op(), ast.Constant(1))

    return _Site(f"range {bound} {symbol} 1", call.lineno, [(start, end, f"{text} {symbol} 1")],
                 source.index[id(call)], apply)


# drop_statement ------------------------------------------------------------------------------------


def _drop_sites(source: _Source, rng: random.Random) -> Iterator[_Site]:
    definition = source.tree.body[0]
    total_lines = definition.end_lineno - definition.lineno + 1
    for owner in [definition] + list(_body_nodes(source)):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(owner, field, None)
            if not isinstance(block, list) or not block or not isinstance(block[0], ast.stmt):
                continue
            offset = 1 if owner is definition and _is_docstring(block[0]) else 0
            if len(block) - offset < 2:
                continue  # dropping the only statement would need a `pass`: not a local bug
            for position in range(offset, len(block)):
                stmt = block[position]
                if isinstance(stmt, ast.Pass) or _is_docstring(stmt):
                    continue
                first = _first_line(stmt)
                # A statement covering more than half the definition is a rewrite, not a bug.
                if (stmt.end_lineno - first + 1) * 2 > total_lines:
                    continue
                edit = _whole_lines(source, stmt, first)
                if edit is not None:
                    yield _Site(f"dropped `{type(stmt).__name__}` statement", first, [edit],
                                source.index[id(owner)], _drop_apply(field, position))


def _drop_apply(field: str, position: int) -> Callable[[ast.AST], None]:
    return lambda n: getattr(n, field).pop(position)


def _first_line(stmt: ast.stmt) -> int:
    return min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])


def _whole_lines(source: _Source, stmt: ast.stmt, first: int) -> tuple[int, int, str] | None:
    """The edit deleting the statement's lines, if nothing else shares them (no `a; b`, no `if x: a`)."""
    line_start = source.line_starts[first - 1]
    start, end = source.span(stmt)
    before = source.code[line_start:start] if first == stmt.lineno else ""
    after = source.code[end : source.line_starts[stmt.end_lineno]]
    if before.strip() or not (after.strip() == "" or after.strip().startswith("#")):
        return None
    return line_start, source.line_starts[stmt.end_lineno], ""


# wrong_variable ------------------------------------------------------------------------------------


def _local_names(definition: ast.AST) -> list[str]:
    """Arguments and names bound in the function's own scope, in order of first appearance."""
    names = []
    if isinstance(definition, FUNCTION_NODES):
        args = definition.args
        names += [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    own = list(_walk_own_scope(definition))
    # Comprehension variables live in the comprehension's scope: outside it they are unbound.
    comprehension_targets = {id(n) for c in own if isinstance(c, ast.comprehension) for n in ast.walk(c.target)}
    for node in own:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and id(node) not in comprehension_targets:
            names.append(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
    return [n for n in dict.fromkeys(names) if n not in ("self", "cls", "_")]


def _wrong_variable_sites(source: _Source, rng: random.Random) -> Iterator[_Site]:
    definition = source.tree.body[0]
    if not isinstance(definition, FUNCTION_NODES):
        return
    names = _local_names(definition)
    if len(names) < 2:
        return
    for node in _walk_own_scope(definition):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names:
            new = rng.choice([n for n in names if n != node.id])
            start, end = source.span(node)
            yield _Site(f"`{node.id}` -> `{new}`", node.lineno, [(start, end, new)], source.index[id(node)],
                        lambda n, new=new: setattr(n, "id", new))


# negate_condition ----------------------------------------------------------------------------------

# `not` binds looser than comparisons and arithmetic, so `not a < b` would be correct; the parentheses
# are there for readability (`not (x is not None)`), and required for the looser boolean/if/walrus forms.
BARE_NEGATABLE = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant)


def _negate_sites(source: _Source, rng: random.Random) -> Iterator[_Site]:
    for node in _body_nodes(source):
        if not isinstance(node, (ast.If, ast.While, ast.IfExp)):
            continue
        test = node.test
        start, end = source.span(test)
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            replacement, detail = source.text(test.operand), "removed `not` from the condition"
            apply = lambda n: setattr(n, "test", n.test.operand)  # noqa: E731
        else:
            text = source.code[start:end]
            replacement = f"not {text}" if isinstance(test, BARE_NEGATABLE) else f"not ({text})"
            detail = "negated the condition"
            apply = lambda n: setattr(n, "test", ast.UnaryOp(ast.Not(), n.test))  # noqa: E731
        yield _Site(f"{detail} of `{type(node).__name__.lower()}`", test.lineno, [(start, end, replacement)],
                    source.index[id(node)], apply)


SITE_FINDERS = {
    "operator_swap": _operator_sites,
    "off_by_one": _off_by_one_sites,
    "drop_statement": _drop_sites,
    "wrong_variable": _wrong_variable_sites,
    "negate_condition": _negate_sites,
}


# ---------------------------------------------------------------------------------------------------
# Snippet -> pair


@dataclass(frozen=True)
class RulesConfig:
    seed: int = 0
    kinds: tuple[str, ...] = MUTATION_KINDS
    describe: DescribeConfig = DescribeConfig()

    def __post_init__(self):
        unknown = set(self.kinds) - set(MUTATION_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"mutation kinds must be a non-empty subset of {MUTATION_KINDS}, got {self.kinds}")


@dataclass
class PairResult:
    pair: dict | None
    stage: str | None  # the stage that dropped the snippet: "describe" or "mutate"
    reason: str | None
    seconds: tuple[float, float]  # wall time in describe, in mutate


def snippet_to_pair(snippet: dict, config: RulesConfig) -> PairResult:
    """The describe and mutate stages for one snippet: a pair, or the stage and reason it was dropped."""
    start = time.perf_counter()
    if snippet.get("language") != "python":
        return PairResult(None, "describe", "unsupported_language", (time.perf_counter() - start, 0.0))
    prompt = describe(snippet["code"], snippet.get("name"), config.describe)
    described = time.perf_counter()
    if prompt is None:
        return PairResult(None, "describe", "no_description", (described - start, 0.0))
    mutation = mutate(snippet["code"], seed=config.seed, key=snippet["id"], kinds=config.kinds)
    seconds = (described - start, time.perf_counter() - described)
    if mutation is None:
        return PairResult(None, "mutate", "no_mutation", seconds)
    pair = {"id": snippet["id"], "prompt": prompt, "chosen": snippet["code"], "rejected": mutation.code,
            "mutation": mutation.kind, "mutation_detail": f"{mutation.detail} (line {mutation.line})"}
    for key in ("name", "language", "repo", "path", "lineno", "license", "commit"):
        pair[key] = snippet.get(key)
    return PairResult(pair, None, None, seconds)
