"""infra/terraform against cluster/topology.json, without terraform or its providers.

Neither the terraform binary nor the providers can be downloaded here, so the HCL is
parsed with python-hcl2 and the parts that decide the shape of the deployment are
*evaluated* by a small interpreter below (the subset of HCL expressions the modules
use: references, for expressions, the functions listed in ``_FUNCTIONS``, and
templatefile). Resource attributes only the cloud knows (ids, DNS names) evaluate to
opaque strings such as ``<<root.beijing.network.alicloud_vswitch.zone[beijing-a].id>>``,
so a test can still check that a zone's node sits in that zone's vSwitch. Anything the
interpreter does not know raises, so a change it cannot follow fails here rather than
passing.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import hcl2
import pytest
from lark import Token, Tree

from clearinghouse import topology as topology_mod
from clearinghouse.localcluster.cassandra import TOKEN_MIN, TOKEN_SPACE
from clearinghouse.storage.schema import keyspace_cql

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TF = REPO / "infra" / "terraform"
TOPOLOGY_PATH = REPO / "cluster" / "topology.json"
EXAMPLE_TFVARS = TF / "example.tfvars"
_NO_COMMENTS = hcl2.SerializationOptions(with_comments=False)

MODULE_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")
# The mapping the issue asks for: each city of the NetsUnion model in its own region.
EXPECTED_REGIONS = {"beijing": "cn-beijing", "shanghai": "cn-shanghai", "shenzhen": "cn-shenzhen"}


# -- reading HCL into blocks -----------------------------------------------------------


def _trees(node: Tree) -> list[Tree]:
    """Children that are trees, without newlines and comments."""
    return [c for c in node.children if isinstance(c, Tree) and c.data != "new_line_or_comment"]


def _name(node: Tree) -> str:
    """An attribute or block name, or a block label."""
    if node.data in ("identifier", "keyword"):
        return str(node.children[0])
    if node.data == "string":
        return "".join(str(p.children[0]) for p in node.children if isinstance(p, Tree))
    raise AssertionError(f"not a name: {node.data}")


@dataclass
class Block:
    type: str
    labels: tuple[str, ...]
    attrs: dict[str, Tree]
    blocks: list[Block]
    file: Path

    def sub(self, type_: str) -> list[Block]:
        return [b for b in self.blocks if b.type == type_]


def _body(body: Tree, file: Path) -> tuple[dict[str, Tree], list[Block]]:
    attrs: dict[str, Tree] = {}
    blocks: list[Block] = []
    for item in _trees(body):
        if item.data == "attribute":
            name_node, expr = _trees(item)
            attrs[_name(name_node)] = expr
        elif item.data == "block":
            parts = _trees(item)
            inner = parts[-1]
            a, b = _body(inner, file)
            blocks.append(Block(_name(parts[0]), tuple(_name(p) for p in parts[1:-1]), a, b, file))
    return attrs, blocks


def parse_file(path: Path) -> tuple[dict[str, Tree], list[Block]]:
    tree = hcl2.parses_to_tree(path.read_text())
    (body,) = _trees(tree)
    return _body(body, path)


@dataclass
class Module:
    dir: Path
    blocks: list[Block] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> Module:
        m = cls(directory)
        for f in sorted(directory.glob("*.tf")):
            m.blocks.extend(parse_file(f)[1])
        return m

    def of(self, type_: str) -> list[Block]:
        return [b for b in self.blocks if b.type == type_]

    def variables(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of("variable")}

    def outputs(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of("output")}

    def locals(self) -> dict[str, Tree]:
        out: dict[str, Tree] = {}
        for b in self.of("locals"):
            out.update(b.attrs)
        return out

    def resource(self, type_: str, name: str) -> Block:
        for b in self.of("resource"):
            if b.labels == (type_, name):
                return b
        raise KeyError(f"{self.dir.name}: no resource {type_}.{name}")

    def resource_types(self) -> set[str]:
        return {b.labels[0] for b in self.of("resource")}

    def calls(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of("module")}


# -- evaluating HCL expressions --------------------------------------------------------


class EvalError(Exception):
    pass


def _num(x: Any) -> int | Fraction:
    if isinstance(x, bool) or not isinstance(x, int | Fraction):
        raise EvalError(f"not a number: {x!r}")
    if isinstance(x, Fraction) and x.denominator == 1:
        return int(x)
    return x


def _norm(x: Any) -> Any:
    return _num(x) if isinstance(x, int | Fraction) and not isinstance(x, bool) else x


def _cidrsubnet(prefix: str, newbits: int, netnum: int) -> str:
    net = ipaddress.ip_network(prefix)
    return str(next(itertools.islice(net.subnets(prefixlen_diff=newbits), netnum, None)))


def _cidrhost(prefix: str, hostnum: int) -> str:
    net = ipaddress.ip_network(prefix)
    return str(net.network_address + hostnum)


def _format(spec: str, *args: Any) -> str:
    values = list(args)

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "%%":
            return "%"
        v = values.pop(0)
        if m.group(1) == "d":
            n = _num(v)
            if not isinstance(n, int):
                raise EvalError(f"format %d of a fraction {v!r}")
            return str(n)
        if m.group(1) == "s":
            return _tostring(v)
        raise EvalError(f"format verb %{m.group(1)} not supported")

    return re.sub(r"%%|%([a-z])", one, spec)


def _tostring(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | Fraction):
        n = _num(v)
        return str(n) if isinstance(n, int) else str(float(n))
    raise EvalError(f"cannot interpolate {v!r}")


def _one(xs: list[Any]) -> Any:
    if len(xs) > 1:
        raise EvalError(f"one() of {len(xs)} elements")
    return xs[0] if xs else None


def _indent(n: int, s: str) -> str:
    return s.replace("\n", "\n" + " " * n)


def _pow(a: Any, b: Any) -> Any:
    base, exp = _num(a), _num(b)
    if not isinstance(exp, int):
        raise EvalError("pow with a fractional exponent")
    return _num(Fraction(base) ** exp)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "length": len,
    "jsondecode": json.loads,
    "file": lambda p: Path(p).read_text(),
    "cidrsubnet": _cidrsubnet,
    "cidrhost": _cidrhost,
    "format": _format,
    "join": lambda sep, xs: sep.join(_tostring(x) for x in xs),
    "sort": sorted,
    "keys": sorted,
    "values": lambda m: [m[k] for k in sorted(m)],
    "concat": lambda *ls: [x for lst in ls for x in lst],
    "flatten": lambda xs: [y for x in xs for y in (x if isinstance(x, list) else [x])],
    "distinct": lambda xs: [x for i, x in enumerate(xs) if x not in xs[:i]],
    "merge": lambda *ms: {k: v for m in ms for k, v in m.items()},
    "lookup": lambda m, k, default=None: m.get(k, default),
    "contains": lambda xs, v: v in xs,
    "one": _one,
    "pow": _pow,
    "replace": lambda s, old, new: s.replace(old, new),
    "toset": frozenset,
    "indent": _indent,
    "startswith": lambda s, p: s.startswith(p),
    "alltrue": all,
}


@dataclass
class ModuleInstance:
    """One module with its input values: the unit references are resolved in."""

    module: Module
    label: str
    inputs: dict[str, Callable[[], Any]]
    _locals: dict[str, Any] = field(default_factory=dict)
    _busy: set[str] = field(default_factory=set)
    _vars: dict[str, Any] = field(default_factory=dict)

    def var(self, name: str) -> Any:
        if name in self.inputs:
            if name not in self._vars:
                self._vars[name] = self.inputs[name]()
            return self._vars[name]
        block = self.module.variables().get(name)
        if block is None:
            raise EvalError(f"{self.label}: no variable {name}")
        if "default" not in block.attrs:
            raise EvalError(f"{self.label}: variable {name} has no value and no default")
        return Evaluator(self).eval(block.attrs["default"])

    def local(self, name: str) -> Any:
        if name not in self._locals:
            if name in self._busy:
                raise EvalError(f"{self.label}: local.{name} refers to itself")
            self._busy.add(name)
            tree = self.module.locals().get(name)
            if tree is None:
                raise EvalError(f"{self.label}: no local {name}")
            self._locals[name] = Evaluator(self).eval(tree)
            self._busy.discard(name)
        return self._locals[name]

    def child(self, call_name: str) -> ModuleInstance:
        call = self.module.calls()[call_name]
        source = Evaluator(self).eval(call.attrs["source"])
        module = Module.load((self.module.dir / source).resolve())
        ev = Evaluator(self)
        inputs = {
            k: (lambda t=t: ev.eval(t))
            for k, t in call.attrs.items()
            if k not in ("source", "providers", "depends_on", "version", "for_each", "count")
        }
        return ModuleInstance(module, f"{self.label}.{call_name}", inputs)

    def output(self, name: str) -> Any:
        block = self.module.outputs().get(name)
        if block is None:
            raise EvalError(f"{self.label}: no output {name}")
        return Evaluator(self).eval(block.attrs["value"])

    def instances(self, type_: str, name: str) -> dict[str, Resource] | Resource:
        """A resource: one per for_each key, or a single one."""
        block = self.module.resource(type_, name)
        ref = f"{self.label}.{type_}.{name}"
        if "for_each" in block.attrs:
            keyed = Evaluator(self).eval(block.attrs["for_each"])
            items = keyed.items() if isinstance(keyed, dict) else ((k, k) for k in keyed)
            return {
                k: Resource(self, block, f"{ref}[{k}]", {"key": k, "value": v}) for k, v in items
            }
        return Resource(self, block, ref, None)


@dataclass
class Resource:
    """A resource instance: configured arguments evaluate, the rest is opaque."""

    instance: ModuleInstance
    block: Block
    ref: str
    each: dict[str, Any] | None

    def attr(self, name: str) -> Any:
        if name in self.block.attrs:
            return Evaluator(self.instance, each=self.each).eval(self.block.attrs[name])
        return f"<<{self.ref}.{name}>>"

    def nested(self, block_type: str) -> list[dict[str, Any]]:
        """Evaluated attributes of nested blocks, ``dynamic`` ones expanded."""
        out = []
        ev = Evaluator(self.instance, each=self.each)
        for b in self.block.sub(block_type):
            out.append({k: ev.eval(t) for k, t in b.attrs.items()})
        for d in self.block.sub("dynamic"):
            if d.labels != (block_type,):
                continue
            collection = ev.eval(d.attrs["for_each"])
            (content,) = d.sub("content")
            for k, v in collection.items():
                inner = ev.bind(block_type, {"key": k, "value": v})
                out.append({a: inner.eval(t) for a, t in content.attrs.items()})
        return out


class _Namespace:
    def __init__(self, get: Callable[[str], Any]) -> None:
        self.get = get


class Evaluator:
    def __init__(
        self,
        instance: ModuleInstance | None,
        each: dict[str, Any] | None = None,
        names: dict[str, Any] | None = None,
    ) -> None:
        self.instance = instance
        self.each = each
        self.names = names or {}

    def bind(self, name: str, value: Any) -> Evaluator:
        return Evaluator(self.instance, self.each, {**self.names, name: value})

    # the roots a reference can start from
    def root(self, name: str) -> Any:
        if name in self.names:
            return self.names[name]
        inst = self.instance
        if inst is None:
            raise EvalError(f"unknown name {name} in a template")
        if name == "var":
            return _Namespace(inst.var)
        if name == "local":
            return _Namespace(inst.local)
        if name == "path":
            return {"module": str(inst.module.dir), "root": str(TF)}
        if name == "each":
            if self.each is None:
                raise EvalError("each outside for_each")
            return self.each
        if name == "module":
            return _Namespace(lambda call: _Namespace(inst.child(call).output))
        if name == "data":
            return _Namespace(lambda t: _Namespace(lambda n: _Opaque(f"{inst.label}.data.{t}.{n}")))
        if name in inst.module.resource_types():
            return _Namespace(lambda n: inst.instances(name, n))
        raise EvalError(f"{inst.label}: unknown name {name}")

    def getattr(self, obj: Any, name: str) -> Any:
        if isinstance(obj, _Namespace):
            return obj.get(name)
        if isinstance(obj, Resource):
            return obj.attr(name)
        if isinstance(obj, _Opaque):
            return _Opaque(f"{obj.ref}.{name}")
        if isinstance(obj, dict):
            if name not in obj:
                raise EvalError(f"no attribute {name} in {sorted(obj)}")
            return obj[name]
        raise EvalError(f"cannot take .{name} of {obj!r}")

    def index(self, obj: Any, key: Any) -> Any:
        if isinstance(obj, _Opaque):
            return _Opaque(f"{obj.ref}[{key}]")
        if isinstance(obj, list):
            return obj[_num(key)]
        if isinstance(obj, dict):
            if key not in obj:
                raise EvalError(f"no key {key!r} in {sorted(obj)}")
            return obj[key]
        raise EvalError(f"cannot index {obj!r}")

    def eval(self, node: Tree | Token) -> Any:
        if isinstance(node, Token):
            raise EvalError(f"bare token {node!r}")
        kind = node.data
        kids = _trees(node)
        if kind == "expr_term":
            (only,) = kids
            return self.eval(only)
        if kind == "int_lit":
            return int(str(node.children[0]))
        if kind == "float_lit":
            return _num(Fraction(str(node.children[0])))
        if kind == "literal_value":
            return {"true": True, "false": False, "null": None}[str(node.children[0])]
        if kind == "string":
            return self.string(node)
        if kind == "identifier":
            return self.root(str(node.children[0]))
        if kind == "get_attr_expr_term":
            obj, attr = kids
            return self.getattr(self.eval(obj), _name(_trees(attr)[0]))
        if kind == "index_expr_term":
            obj, idx = kids
            if idx.data == "short_index":
                return self.index(self.eval(obj), int(str(idx.children[1])))
            (key,) = _trees(idx)
            return self.index(self.eval(obj), self.eval(key))
        if kind == "tuple":
            return [self.eval(k) for k in kids]
        if kind == "object":
            out = {}
            for elem in kids:
                key_node, value = _trees(elem)
                (key_expr,) = _trees(key_node)
                inner = _trees(key_expr)
                if (
                    key_expr.data == "expr_term"
                    and len(inner) == 1
                    and inner[0].data == "identifier"
                ):
                    key = str(inner[0].children[0])
                else:
                    key = _tostring(self.eval(key_expr))
                out[key] = self.eval(value)
            return out
        if kind == "function_call":
            name = _name(kids[0])
            args = [self.eval(a) for a in (_trees(kids[1]) if len(kids) > 1 else [])]
            if name == "templatefile":
                return render_template(Path(args[0]), args[1])
            if name not in _FUNCTIONS:
                raise EvalError(f"function {name} not supported here")
            return _norm(_FUNCTIONS[name](*args))
        if kind == "conditional":
            cond, a, b = kids
            return self.eval(a) if self.eval(cond) else self.eval(b)
        if kind == "binary_op":
            left, term = kids
            op_node, right = _trees(term)
            return self.binary(str(op_node.children[0]), self.eval(left), right)
        if kind == "unary_op":
            op = str(node.children[0])
            v = self.eval(kids[0])
            return -_num(v) if op == "-" else not v
        if kind in ("for_tuple_expr", "for_object_expr"):
            return self.for_expr(node, kids)
        raise EvalError(f"expression {kind} not supported here")

    def binary(self, op: str, left: Any, right_node: Tree) -> Any:
        if op == "&&":
            return bool(left) and bool(self.eval(right_node))
        if op == "||":
            return bool(left) or bool(self.eval(right_node))
        right = self.eval(right_node)
        if op == "==":
            return left == right
        if op == "!=":
            return left != right
        a, b = _num(left), _num(right)
        ops: dict[str, Callable[[Any, Any], Any]] = {
            "+": lambda x, y: x + y,
            "-": lambda x, y: x - y,
            "*": lambda x, y: x * y,
            "/": lambda x, y: Fraction(x) / y,
            "%": lambda x, y: x % y,
            "<": lambda x, y: x < y,
            ">": lambda x, y: x > y,
            "<=": lambda x, y: x <= y,
            ">=": lambda x, y: x >= y,
        }
        return _norm(ops[op](a, b))

    def for_expr(self, node: Tree, kids: list[Tree]) -> Any:
        intro = kids[0]
        if any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in node.children):
            raise EvalError("grouping (...) for expressions not supported here")
        intro_parts = _trees(intro)
        names = [_name(n) for n in intro_parts[:-1]]
        collection = self.eval(intro_parts[-1])
        cond = next((k for k in kids if k.data == "for_cond"), None)
        body = [k for k in kids[1:] if k.data != "for_cond"]
        if isinstance(collection, dict):
            pairs: list[tuple[Any, Any]] = list(collection.items())
        elif isinstance(collection, frozenset):
            pairs = [(v, v) for v in sorted(collection)]
        else:
            pairs = list(enumerate(collection))
        tuple_out: list[Any] = []
        object_out: dict[str, Any] = {}
        for k, v in pairs:
            scope = {names[0]: v} if len(names) == 1 else {names[0]: k, names[1]: v}
            ev = Evaluator(self.instance, self.each, {**self.names, **scope})
            if cond is not None and not ev.eval(_trees(cond)[0]):
                continue
            if node.data == "for_tuple_expr":
                tuple_out.append(ev.eval(body[0]))
            else:
                key = _tostring(ev.eval(body[0]))
                if key in object_out:
                    raise EvalError(f"duplicate key {key} in a for expression")
                object_out[key] = ev.eval(body[1])
        return tuple_out if node.data == "for_tuple_expr" else object_out

    def string(self, node: Tree) -> Any:
        parts: list[Any] = []
        for part in node.children:
            if not isinstance(part, Tree):
                continue
            (piece,) = part.children
            if isinstance(piece, Token):
                if piece.type == "ESCAPED_INTERPOLATION":
                    parts.append(str(piece)[1:])
                elif piece.type == "STRING_CHARS":
                    parts.append(json.loads(f'"{piece}"'))
                else:
                    raise EvalError(f"string part {piece.type} not supported here")
            elif piece.data == "interpolation":
                parts.append(self.eval(_trees(piece)[0]))
            else:
                raise EvalError(f"template directive {piece.data} not supported here")
        if len(parts) == 1 and not isinstance(parts[0], str):
            return parts[0]
        return "".join(_tostring(p) if not isinstance(p, _Opaque) else str(p) for p in parts)


@dataclass(frozen=True)
class _Opaque:
    """A value only the cloud knows (an id, a DNS name): known by where it comes from."""

    ref: str

    def __str__(self) -> str:
        return f"<<{self.ref}>>"


def _matching_brace(text: str, start: int) -> int:
    depth, i, quoted = 0, start, False
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise EvalError("unterminated ${ in a template")


def render_template(path: Path, variables: Mapping[str, Any]) -> str:
    """templatefile(): ``${expr}`` interpolations only (no %{ } directives)."""
    text = path.read_text()
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$${", i) or text.startswith("%%{", i):
            out.append(text[i + 1 : i + 3])
            i += 3
        elif text.startswith("%{", i):
            raise EvalError(f"{path.name}: template directives not supported here")
        elif text.startswith("${", i):
            end = _matching_brace(text, i + 1)
            expr = text[i + 2 : end]
            tree = hcl2.parses_to_tree(f"x = {expr}\n")
            (body,) = _trees(tree)
            (attribute,) = _trees(body)
            value = Evaluator(None, names=dict(variables)).eval(_trees(attribute)[1])
            out.append(str(value) if isinstance(value, _Opaque) else _tostring(value))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# -- fixtures ----------------------------------------------------------------------------


def _tfvars(path: Path) -> dict[str, Tree]:
    attrs, _ = parse_file(path)
    return attrs


@pytest.fixture(scope="module")
def topo_raw() -> dict[str, Any]:
    return json.loads(TOPOLOGY_PATH.read_text())


@pytest.fixture(scope="module")
def topo() -> topology_mod.Topology:
    return topology_mod.load(TOPOLOGY_PATH)


@pytest.fixture(scope="module")
def root() -> ModuleInstance:
    """The root module with its defaults and the example tfvars (images, ranges)."""
    module = Module.load(TF)
    bare = ModuleInstance(module, "root", {})
    ev = Evaluator(bare)
    inputs = {k: (lambda t=t: ev.eval(t)) for k, t in _tfvars(EXAMPLE_TFVARS).items()}
    return ModuleInstance(module, "root", inputs)


@dataclass
class City:
    name: str
    region: ModuleInstance
    network: ModuleInstance
    cassandra: ModuleInstance
    switch: ModuleInstance
    etcd: ModuleInstance


@pytest.fixture(scope="module")
def cities(root: ModuleInstance, topo: topology_mod.Topology) -> dict[str, City]:
    out = {}
    for name in root.module.calls():
        call = root.module.calls()[name]
        if Evaluator(root).eval(call.attrs["source"]) != "./modules/region":
            continue
        region = root.child(name)
        out[name] = City(
            name,
            region,
            region.child("network"),
            region.child("cassandra"),
            region.child("switch"),
            region.child("etcd"),
        )
    return out


def _all_modules() -> list[Path]:
    return [TF, *sorted(p for p in (TF / "modules").iterdir() if p.is_dir())]


def _zone_keys(resources: dict[str, Resource] | Resource) -> set[str]:
    assert isinstance(resources, dict), "a per-zone resource must use for_each keyed by zone"
    return set(resources)


# -- the tests -----------------------------------------------------------------------------


def test_every_file_parses_and_every_module_has_its_files() -> None:
    files = sorted([*TF.rglob("*.tf"), *TF.rglob("*.tfvars")])
    assert len(files) >= 25
    for f in files:
        hcl2.loads(f.read_text())  # raises on a syntax error
    for d in _all_modules():
        missing = [n for n in MODULE_FILES if not (d / n).is_file()]
        assert not missing, f"{d.relative_to(REPO)} lacks {missing}"


def test_root_module_reads_cluster_topology_json(
    root: ModuleInstance, topo_raw: dict[str, Any]
) -> None:
    assert root.local("topology") == topo_raw
    # No HCL or template names a zone: topology.json is the only file that does.
    zone_names = [z["name"] for c in topo_raw["cities"] for z in c["zones"]]
    for f in sorted([*TF.rglob("*.tf"), *TF.rglob("*.tfvars")]):
        code = json.dumps(hcl2.loads(f.read_text(), serialization_options=_NO_COMMENTS))
        named = [z for z in zone_names if z in code]
        assert not named, f"{f.relative_to(REPO)} names zones {named}"
    for f in sorted(TF.rglob("*.tftpl")):
        named = [z for z in zone_names if z in f.read_text()]
        assert not named, f"{f.relative_to(REPO)} names zones {named}"


def test_one_provider_and_one_region_module_per_city(
    root: ModuleInstance, cities: dict[str, City], topo: topology_mod.Topology
) -> None:
    city_names = topo.city_names()
    assert sorted(EXPECTED_REGIONS) == sorted(city_names)
    regions = {}
    for b in root.module.of("provider"):
        assert b.labels == ("alicloud",)
        regions[_identifier_text(b.attrs["alias"])] = Evaluator(root).eval(b.attrs["region"])
    assert regions == EXPECTED_REGIONS

    assert sorted(cities) == sorted(city_names), "one region module per city of topology.json"
    # Nothing may switch a city, a connection or a resource off (or multiply it) by count.
    for d in _all_modules():
        module = Module.load(d)
        for b in module.of("module") + module.of("resource"):
            assert "count" not in b.attrs, f"{d.relative_to(REPO)}: {b.type} {b.labels} uses count"
        for b in module.of("module"):
            assert "for_each" not in b.attrs, f"{d.relative_to(REPO)}: module {b.labels}"
    for name, city in cities.items():
        call = root.module.calls()[name]
        mapping = _provider_map(call.attrs["providers"])
        assert mapping == {"alicloud": f"alicloud.{name}"}, name
        value = city.region.var("city")
        assert value["name"] == name
        assert value["region"] == EXPECTED_REGIONS[name]

    # A full mesh of inter-region connections, each with the right two providers.
    pairs = set()
    for name, call in root.module.calls().items():
        if Evaluator(root).eval(call.attrs["source"]) != "./modules/peering":
            continue
        mapping = _provider_map(call.attrs["providers"])
        local_city = mapping["alicloud.local"].removeprefix("alicloud.")
        peer_city = mapping["alicloud.peer"].removeprefix("alicloud.")
        peering = root.child(name)
        for side, city_name in (("local_router", local_city), ("peer_router", peer_city)):
            network = f"root.{city_name}.network"
            assert peering.var(side) == {
                "region": EXPECTED_REGIONS[city_name],
                "id": f"<<{network}.alicloud_cen_transit_router.this.transit_router_id>>",
                "route_table_id": f"<<{network}.alicloud_cen_transit_router_route_table.this"
                ".transit_router_route_table_id>>",
            }
        pairs.add(frozenset((local_city, peer_city)))
    assert pairs == {frozenset(p) for p in itertools.combinations(city_names, 2)}


def _identifier_text(tree: Tree) -> str:
    """The text of a bare reference such as ``beijing`` or ``alicloud.beijing``."""
    node = tree
    parts: list[str] = []
    while True:
        kids = _trees(node)
        if node.data == "expr_term":
            node = kids[0]
        elif node.data == "get_attr_expr_term":
            parts.insert(0, _name(_trees(kids[1])[0]))
            node = kids[0]
        elif node.data == "identifier":
            parts.insert(0, str(node.children[0]))
            return ".".join(parts)
        elif node.data == "string":
            return _name(node)
        else:
            raise AssertionError(f"not a reference: {node.data}")


def _provider_map(tree: Tree) -> dict[str, str]:
    (obj,) = _trees(tree)
    assert obj.data == "object"
    out = {}
    for elem in _trees(obj):
        key_node, value = _trees(elem)
        out[_identifier_text(_trees(key_node)[0])] = _identifier_text(value)
    return out


def test_zones_land_in_distinct_availability_zones_of_their_city_region(
    cities: dict[str, City], topo: topology_mod.Topology
) -> None:
    defaults = {
        "beijing": ["cn-beijing-h", "cn-beijing-k"],
        "shanghai": ["cn-shanghai-l", "cn-shanghai-m"],
        "shenzhen": ["cn-shenzhen-e", "cn-shenzhen-f"],
    }
    for c in topo.cities:
        city = cities[c.name]
        placed = city.region.var("city")
        assert placed["cidr"] == f"10.{c.index + 1}.0.0/16"
        vswitches = city.network.instances("alicloud_vswitch", "zone")
        assert _zone_keys(vswitches) == {z.name for z in c.zones}
        assert isinstance(vswitches, dict)
        azs = []
        for z in c.zones:
            zone = placed["zones"][z.name]
            # <city>-a -> the region's first availability zone, <city>-b -> its second.
            assert zone["cloud_zone"] == defaults[c.name][z.index_in_city]
            assert zone["cloud_zone"].startswith(EXPECTED_REGIONS[c.name] + "-")
            # The loopback plan 127.0.<city+1>.<zone+1> moved to 10.<city+1>.<zone+1>.0/24.
            assert zone["cidr"] == f"10.{c.index + 1}.{z.index_in_city + 1}.0/24"
            assert z.address == f"127.0.{c.index + 1}.{z.index_in_city + 1}"
            vsw = vswitches[z.name]
            assert vsw.attr("zone_id") == zone["cloud_zone"]
            assert vsw.attr("cidr_block") == zone["cidr"]
            azs.append(zone["cloud_zone"])
        assert len(set(azs)) == len(c.zones) == 2


def _vswitch_ref(city: str, zone: str) -> str:
    return f"<<root.{city}.network.alicloud_vswitch.zone[{zone}].id>>"


def test_every_zone_has_cassandra_and_switch_resources(
    cities: dict[str, City], topo: topology_mod.Topology
) -> None:
    per_zone = {
        "cassandra node": ("cassandra", "alicloud_instance", "node"),
        "switch scaling group": ("switch", "alicloud_ess_scaling_group", "zone"),
        "switch scaling configuration": ("switch", "alicloud_ess_scaling_configuration", "zone"),
        "switch attachment": ("switch", "alicloud_ess_server_group_attachment", "zone"),
        "switch CPU scaling rule": ("switch", "alicloud_ess_scaling_rule", "cpu"),
    }
    covered: dict[str, set[str]] = {what: set() for what in per_zone}
    for c in topo.cities:
        city = cities[c.name]
        az = {z: v["cloud_zone"] for z, v in city.region.var("city")["zones"].items()}
        for what, (sub, type_, name) in per_zone.items():
            keys = _zone_keys(getattr(city, sub).instances(type_, name))
            assert keys == {z.name for z in c.zones}, f"{what} in {c.name}: {keys}"
            covered[what] |= keys

        nodes = city.cassandra.instances("alicloud_instance", "node")
        groups = city.switch.instances("alicloud_ess_scaling_group", "zone")
        attachments = city.switch.instances("alicloud_ess_server_group_attachment", "zone")
        configs = city.switch.instances("alicloud_ess_scaling_configuration", "zone")
        assert isinstance(nodes, dict) and isinstance(groups, dict)
        assert isinstance(attachments, dict) and isinstance(configs, dict)
        server_group = f"<<root.{c.name}.switch.alicloud_nlb_server_group.switch.id>>"
        for z in c.zones:
            # Each zone's nodes are in that zone, in that zone's vSwitch.
            assert nodes[z.name].attr("availability_zone") == az[z.name]
            assert nodes[z.name].attr("vswitch_id") == _vswitch_ref(c.name, z.name)
            assert groups[z.name].attr("vswitch_ids") == [_vswitch_ref(c.name, z.name)]
            assert groups[z.name].attr("min_size") >= 1
            assert "LOAD_BALANCER" in groups[z.name].attr("health_check_types")
            assert attachments[z.name].attr("server_group_id") == server_group
            assert attachments[z.name].attr("type") == "NLB"
            assert attachments[z.name].attr("port") == z.ports.switch
            env = _env(configs[z.name].attr("user_data"))
            assert env["CLEARING_ZONE"] == z.name
            assert env["CLEARING_CITY"] == c.name
            assert env["CLEARING_SWITCH_PORT"] == str(z.ports.switch)
        # One load balancer per city, in front of all its zones.
        lb = city.switch.instances("alicloud_nlb_load_balancer", "switch")
        assert isinstance(lb, Resource)
        mappings = lb.nested("zone_mappings")
        assert sorted(m["zone_id"] for m in mappings) == sorted(az.values())
        assert sorted(m["vswitch_id"] for m in mappings) == sorted(
            _vswitch_ref(c.name, z.name) for z in c.zones
        )
    for what, zones in covered.items():
        assert zones == set(topo.zone_names()), (
            f"{what} missing in {set(topo.zone_names()) - zones}"
        )


def test_switch_load_balancer_serves_grpc_on_the_topology_port_with_health_checks(
    cities: dict[str, City], topo: topology_mod.Topology
) -> None:
    switch_ports = {z.ports.switch for z in topo.zones}
    assert switch_ports == {15051}
    for city in cities.values():
        listener = city.switch.instances("alicloud_nlb_listener", "switch")
        group = city.switch.instances("alicloud_nlb_server_group", "switch")
        assert isinstance(listener, Resource) and isinstance(group, Resource)
        assert listener.attr("listener_port") == 15051
        # TCP passed through: participants' mutual TLS ends on the switch node.
        assert listener.attr("listener_protocol") == "TCP"
        assert group.attr("protocol") == "TCP"
        (check,) = group.nested("health_check")
        assert check["health_check_enabled"] is True
        assert check["health_check_type"] == "TCP"
        assert check["health_check_connect_port"] == 15051
        assert group.attr("connection_drain_enabled") is True


def test_switch_with_an_http_health_path_checks_the_admin_port(
    root: ModuleInstance, topo: topology_mod.Topology
) -> None:
    with_path = ModuleInstance(
        root.module, "root", {**root.inputs, "switch_health_check_path": lambda: "/healthz"}
    )
    group = (
        with_path.child("beijing").child("switch").instances("alicloud_nlb_server_group", "switch")
    )
    assert isinstance(group, Resource)
    (check,) = group.nested("health_check")
    assert check["health_check_type"] == "HTTP"
    assert check["health_check_connect_port"] == topo.zones[0].ports.admin_http
    assert check["health_check_url"] == "/healthz"


def _env(text: str) -> dict[str, str]:
    """KEY=VALUE lines of a rendered cloud-init file (any indentation)."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*([A-Z][A-Z0-9_]*)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_keyspace_replication_matches_the_topology_keyspace(
    root: ModuleInstance, cities: dict[str, City], topo: topology_mod.Topology
) -> None:
    keyspace = root.local("keyspace")
    # One replica per Cassandra node of each city: count the nodes the HCL creates.
    nodes_per_city = {
        name: len(_zone_keys(city.cassandra.instances("alicloud_instance", "node")))
        for name, city in cities.items()
    }
    assert nodes_per_city == {c.name: len(c.zones) for c in topo.cities}
    assert keyspace == {
        "name": topo.keyspace.name,
        "class": "NetworkTopologyStrategy",
        "replication": nodes_per_city,
        "write_consistency": topo.keyspace.write_consistency,
        "read_consistency": topo.keyspace.read_consistency,
    }
    assert keyspace["write_consistency"] == "QUORUM"
    # The same clause the switch's schema code writes.
    assert root.local("keyspace_replication_cql") == keyspace_cql(
        topo.keyspace.name, keyspace["replication"]
    )
    # QUORUM of all replicas is more than any one city holds: two cities at least.
    total = sum(keyspace["replication"].values())
    assert total // 2 + 1 > max(keyspace["replication"].values())
    # What the switch nodes are told matches.
    for city in cities.values():
        configs = city.switch.instances("alicloud_ess_scaling_configuration", "zone")
        assert isinstance(configs, dict)
        for cfg in configs.values():
            env = _env(cfg.attr("user_data"))
            assert env["CLEARING_KEYSPACE"] == topo.keyspace.name
            assert env["CLEARING_WRITE_CONSISTENCY"] == topo.keyspace.write_consistency
            assert env["CLEARING_READ_CONSISTENCY"] == topo.keyspace.read_consistency


def _yaml_value(text: str, key: str) -> str:
    m = re.search(rf"^\s*{re.escape(key)}:\s*(.*)$", text, re.M)
    assert m, f"{key} missing"
    return m.group(1).strip().strip("'\"")


def test_cassandra_nodes_have_dc_city_rack_zone_and_the_local_token_rule(
    cities: dict[str, City], topo: topology_mod.Topology
) -> None:
    all_addresses = []
    tokens = []
    for c in topo.cities:
        nodes = cities[c.name].cassandra.instances("alicloud_instance", "node")
        assert isinstance(nodes, dict)
        for z in c.zones:
            node = nodes[z.name]
            text = node.attr("user_data")
            assert f"\n      dc={c.name}\n" in text
            assert f"\n      rack={z.name}\n" in text
            address = node.attr("private_ip")
            assert address == f"10.{c.index + 1}.{z.index_in_city + 1}.20"
            assert _yaml_value(text, "listen_address") == address
            assert _yaml_value(text, "storage_port") == str(z.ports.storage)
            assert _yaml_value(text, "native_transport_port") == str(z.ports.cql)
            assert _yaml_value(text, "commitlog_sync") == "batch"
            assert _yaml_value(text, "endpoint_snitch") == "GossipingPropertyFileSnitch"
            # clearinghouse.localcluster.cassandra.nodes: even spread per city + city index.
            expected = TOKEN_MIN + z.index_in_city * (TOKEN_SPACE // len(c.zones)) + c.index
            assert _yaml_value(text, "initial_token") == str(expected)
            tokens.append(expected)
            all_addresses.append(address)
    assert len(set(tokens)) == len(tokens) == len(topo.zones)
    # Every node knows every other as a seed.
    for city in cities.values():
        nodes = city.cassandra.instances("alicloud_instance", "node")
        assert isinstance(nodes, dict)
        for node in nodes.values():
            seeds = _yaml_value(node.attr("user_data"), "- seeds").split(",")
            assert sorted(s.split(":")[0] for s in seeds) == sorted(all_addresses)


def test_etcd_one_member_per_city_and_switch_nodes_find_their_own_city_first(
    root: ModuleInstance, cities: dict[str, City], topo: topology_mod.Topology
) -> None:
    members = root.local("etcd_members")
    assert [m["name"] for m in members] == [z.name for z in topo.etcd_zones()]
    addresses = {m["city"]: f"{m['address']}:{m['client_port']}" for m in members}
    assert len(set(addresses.values())) == 3
    for c in topo.cities:
        city = cities[c.name]
        member = city.etcd.instances("alicloud_instance", "member")
        assert isinstance(member, Resource)
        etcd_zone = c.zones[topo.etcd_zone_index]
        assert (
            member.attr("availability_zone")
            == city.region.var("city")["zones"][etcd_zone.name]["cloud_zone"]
        )
        assert member.attr("vswitch_id") == _vswitch_ref(c.name, etcd_zone.name)
        env = _env(member.attr("user_data"))
        assert env["ETCD_NAME"] == etcd_zone.name
        initial = dict(p.split("=", 1) for p in env["ETCD_INITIAL_CLUSTER"].split(","))
        assert initial == {m["name"]: f"https://{m['address']}:{m['peer_port']}" for m in members}
        assert env["ETCD_CLIENT_CERT_AUTH"] == "true"

        own_cassandra = root.local("cassandra_by_city")[c.name]
        configs = city.switch.instances("alicloud_ess_scaling_configuration", "zone")
        assert isinstance(configs, dict)
        for cfg in configs.values():
            env = _env(cfg.attr("user_data"))
            etcd = env["CLEARING_ETCD_ENDPOINTS"].split(",")
            assert etcd[0] == addresses[c.name]
            assert sorted(etcd) == sorted(addresses.values())
            contact = env["CLEARING_CASSANDRA_CONTACT_POINTS"].split(",")
            assert contact[: len(own_cassandra)] == own_cassandra
            assert len(contact) == len(topo.zones)
            assert env["CLEARING_CASSANDRA_LOCAL_DC"] == c.name


def test_every_variable_and_output_is_described_and_typed() -> None:
    checked = 0
    for d in _all_modules():
        module = Module.load(d)
        inst = ModuleInstance(module, d.name, {})
        for name, block in module.variables().items():
            where = f"{d.relative_to(REPO)}: variable {name}"
            assert "type" in block.attrs, f"{where} has no type"
            assert "description" in block.attrs, f"{where} has no description"
            text = Evaluator(inst).eval(block.attrs["description"])
            assert isinstance(text, str) and len(text.strip()) >= 10, where
            checked += 1
        for name, block in module.outputs().items():
            where = f"{d.relative_to(REPO)}: output {name}"
            assert "description" in block.attrs, f"{where} has no description"
            text = Evaluator(inst).eval(block.attrs["description"])
            assert isinstance(text, str) and len(text.strip()) >= 10, where
            checked += 1
    assert checked > 100


def test_required_providers_are_pinned() -> None:
    for d in _all_modules():
        module = Module.load(d)
        (tf,) = module.of("terraform")
        where = str(d.relative_to(REPO))
        assert "required_version" in tf.attrs, where
        (required,) = tf.sub("required_providers")
        used = {t.split("_", 1)[0] for t in module.resource_types()} | {
            b.labels[0].split("_", 1)[0] for b in module.of("data")
        }
        used |= {"alicloud"} if module.calls() or module.of("provider") else set()
        assert used <= set(required.attrs), f"{where}: providers {used - set(required.attrs)}"
        for spec_tree in required.attrs.values():
            spec = _provider_spec(spec_tree)
            assert spec["source"] == "aliyun/alicloud", where
            version = spec["version"]
            if d == TF:
                # The root decides: one minor release, patches only.
                assert re.fullmatch(r"~> \d+\.\d+\.\d+", version), f"{where}: {version}"
            else:
                assert re.search(r">=\s*\d", version) and re.search(r"<\s*\d", version), (
                    f"{where}: a module's range needs a lower and an upper bound: {version}"
                )


def _provider_spec(tree: Tree) -> dict[str, str]:
    """source and version of a required_providers entry (configuration_aliases skipped)."""
    (obj,) = _trees(tree)
    out = {}
    for elem in _trees(obj):
        key_node, value = _trees(elem)
        key = _identifier_text(_trees(key_node)[0])
        if key in ("source", "version"):
            out[key] = Evaluator(None).eval(value)
    return out


# -- secrets -----------------------------------------------------------------------------

SECRET_TEXT = [
    (re.compile(r"-----BEGIN [A-Z ]*(PRIVATE KEY|CERTIFICATE)-----"), "a PEM block"),
    (re.compile(r"\bLTAI[0-9A-Za-z]{12,30}\b"), "an Alibaba Cloud AccessKey id"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\bSTS\.[0-9A-Za-z]{20,}"), "an STS token"),
    (re.compile(r"\beyJ[0-9A-Za-z_-]{10,}\.[0-9A-Za-z_-]{10,}"), "a JWT"),
]
# Arguments and variables whose value is a secret; *_name(s), *_id(s) and *_arn(s) only
# point at one. (A Cassandra ring token or etcd's cluster token is no secret: "token"
# counts alone or as an auth, access, api, session, security, bearer or refresh token.)
SECRET_NAME = re.compile(
    r"(password|passwd|secret_key|secret_value|secret_data|access_key|private_key|api_key|"
    r"(auth|access|api|session|security|bearer|refresh)_token|^token|credential)s?$",
    re.I,
)
REFERENCE_SUFFIX = re.compile(r"_(name|names|id|ids|arn|arns|path|file)$", re.I)


def _references(tree: Tree) -> list[str]:
    """Every dotted reference (var.x, data.a.b.c, local.y) an expression makes."""
    out = []
    for node in tree.iter_subtrees_topdown():
        if node.data in ("get_attr_expr_term", "identifier"):
            try:
                out.append(_identifier_text(node))
            except AssertionError:
                continue
    return out


def _is_literal(tree: Tree) -> bool:
    """No reference, interpolation or call anywhere (object keys aside)."""
    if tree.data in ("interpolation", "identifier", "function_call"):
        return False
    return all(_is_literal(t) for t in _trees(tree) if t.data != "object_elem_key")


def _walk_attrs(blocks: list[Block]) -> Iterator[tuple[Block, str, Tree]]:
    for b in blocks:
        for name, tree in b.attrs.items():
            yield b, name, tree
            for sub in tree.iter_subtrees():
                if sub.data == "object_elem":
                    key_node, value = _trees(sub)
                    try:
                        key = _identifier_text(_trees(key_node)[0])
                    except AssertionError:
                        continue
                    yield b, key, value
        yield from _walk_attrs(b.blocks)


def secret_findings(files: dict[str, str]) -> list[str]:
    """Hard-coded secrets in HCL sources (name -> text): each finding says where and what."""
    found = []
    blocks_by_file = {}
    for name, text in files.items():
        for pattern, what in SECRET_TEXT:
            if pattern.search(text):
                found.append(f"{name}: {what}")
        if name.endswith((".tf", ".tfvars")):
            tree = hcl2.parses_to_tree(text)
            (body,) = _trees(tree)
            attrs, blocks = _body(body, Path(name))
            blocks_by_file[name] = (attrs, blocks)
    sensitive_vars = {
        b.labels[0]
        for _, blocks in blocks_by_file.values()
        for b in blocks
        if b.type == "variable"
        and "sensitive" in b.attrs
        and Evaluator(None).eval(b.attrs["sensitive"]) is True
    }
    for name, (attrs, blocks) in blocks_by_file.items():
        top = Block("file", (), attrs, [], Path(name))
        for _block, key, value in _walk_attrs([top, *blocks]):
            if not SECRET_NAME.search(key) or REFERENCE_SUFFIX.search(key):
                continue
            if _is_literal(value):
                if Evaluator(None).eval(value) in (None, ""):
                    continue
                found.append(f"{name}: {key} is a literal")
                continue
            refs = _references(value)
            ok = [r for r in refs if r.startswith("data.alicloud_kms_secret")] or [
                r for r in refs if r.startswith("var.") and r.split(".")[1] in sensitive_vars
            ]
            if not ok:
                found.append(f"{name}: {key} comes from neither a sensitive variable nor KMS")
        for block in blocks:
            if block.type != "variable":
                continue
            var = block.labels[0]
            if SECRET_NAME.search(var) and not REFERENCE_SUFFIX.search(var):
                if var not in sensitive_vars:
                    found.append(f"{name}: variable {var} holds a secret but is not sensitive")
                if "default" in block.attrs and Evaluator(None).eval(block.attrs["default"]):
                    found.append(f"{name}: variable {var} has a default secret")
    return found


def test_no_secret_is_hard_coded() -> None:
    files = {
        str(p.relative_to(REPO)): p.read_text()
        for p in sorted([*TF.rglob("*.tf"), *TF.rglob("*.tfvars"), *TF.rglob("*.tftpl")])
    }
    assert len(files) > 25
    assert secret_findings(files) == []


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ('resource "alicloud_instance" "a" {\n  password = "Hunter2!Hunter2"\n}\n', "literal"),
        ('locals {\n  x = { db_password = "s3cr3t" }\n}\n', "literal"),
        ('provider "alicloud" {\n  secret_key = "abc"\n}\n', "literal"),
        ('provider "alicloud" {\n  access_key = "LTAI5tAbCdEfGhIjKlMnOpQr"\n}\n', "AccessKey"),
        ('locals {\n  k = "-----BEGIN RSA PRIVATE KEY-----"\n}\n', "PEM"),
        (
            'variable "db_password" {\n  type = string\n}\n'
            'resource "x_db" "a" {\n  password = var.db_password\n}\n',
            "not sensitive",
        ),
        (
            'variable "db_password" {\n  type = string\n  sensitive = true\n  default = "x"\n}\n',
            "default secret",
        ),
    ],
)
def test_the_secret_scan_finds_planted_secrets(snippet: str, expected: str) -> None:
    findings = secret_findings({"planted.tf": snippet})
    assert any(expected in f for f in findings), findings


def test_the_secret_scan_accepts_references() -> None:
    ok = (
        'variable "db_password" {\n  type = string\n  sensitive = true\n}\n'
        'resource "x_db" "a" {\n  password = var.db_password\n'
        "  token = data.alicloud_kms_secrets.tls.secrets[0].secret_data\n"
        '  key_pair_name = "ops"\n  switch_key_secret_name = "clearing-key"\n}\n'
    )
    assert secret_findings({"ok.tf": ok}) == []


def test_tls_material_is_referenced_by_name_only(root: ModuleInstance) -> None:
    tls = Module.load(TF / "modules" / "tls")
    (secrets,) = [b for b in tls.of("data") if b.labels[0] == "alicloud_kms_secrets"]
    # enable_details would put secret_data into the plan and the state.
    assert "enable_details" not in secrets.attrs
    names = root.var("tls_secret_names")
    assert names and all(isinstance(v, str) and v for v in names.values())
    # Every secret is read by some node at boot (the modules index secret_names by purpose).
    templates = "\n".join(p.read_text() for p in (TF / "modules").rglob("*.tf"))
    for purpose in names:
        assert f'secret_names["{purpose}"]' in templates, f"{purpose} is never used"
