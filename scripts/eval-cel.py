#!/usr/bin/env python3
"""Evaluates approver-policy `validations[].rule` CEL expressions the way approver-policy does, with
CEL's reference C++ implementation (PyPI cel-expr-python, installed by scripts/k8s-tools.sh).

approver-policy (cert-manager/approver-policy, pkg/internal/approver/validation/validator.go)
compiles each rule with cel-go in an environment of

  * `self`, a string: ONE value of the attribute (one URI SAN, one DNS name, ...), the URI as Go's
    url.URL.String() writes it back (pkg/internal/approver/allowed/evaluator.go);
  * `cr`, the CertificateRequest as a message with `name`, `namespace` and `username`
    (validation/certificaterequest.proto; username is who created the request);
  * the standard library (`startsWith`, `matches` = RE2 syntax, unanchored search), the strings
    extension (cel-go ext.Strings) and its own serviceaccount.getName/getNamespace;

type-checks it, refuses a rule whose type is not bool, and evaluates it once per value. A value is
allowed when it matches one of `values` (`*` = any run of characters) AND every rule is true for
it; an evaluation error denies. (allowed/evaluator.go evaluateSlice, and the design in
design/20230726-cel-policy.md: "ALL validations pass for ALL attribute values".)

Here `cr` is a map from string to string (same field access, same values; a misspelt field is an
evaluation error here rather than a compile error there), the strings extension is loaded, and the
serviceaccount functions are not declared (a rule using them fails to compile: it is reported, not
guessed at). cel-cpp's `matches` is RE2 itself, so the regular expressions read as in Go's regexp
(RE2 syntax): `$` is the end of the text, `\\w` and `\\d` are ASCII.

Input (stdin, JSON): {"rules": [RULE, ...], "requests": [{"self": STR, "cr": {...}}, ...]}
Output (stdout, JSON): one list per rule, one entry per request: true, false, or a string saying
why the rule did not compile, did not type-check as bool, or failed to evaluate.
Runs with the Python of the venv scripts/k8s-tools.sh installs.
"""
import json
import sys

from cel_expr_python import cel
from cel_expr_python.ext import ext_strings


def main():
    job = json.load(sys.stdin)
    env = cel.NewEnv(
        variables={"self": cel.Type.STRING, "cr": cel.Type.Map(cel.Type.STRING, cel.Type.STRING)},
        extensions=[ext_strings.ExtStrings()],
    )
    out = []
    for rule in job["rules"]:
        try:
            program = env.compile(rule)
        except Exception as e:  # cel-cpp reports parse and check errors as RuntimeError
            out.append([f"does not compile: {e}"] * len(job["requests"]))
            continue
        if program.return_type() != cel.Type.BOOL:
            out.append([f"is of type {program.return_type().name()}, not bool"] * len(job["requests"]))
            continue
        results = []
        for request in job["requests"]:
            try:
                value = program.eval(data={"self": request["self"], "cr": request["cr"]}).value()
            except Exception as e:
                value = e
            # A bool-typed program yields a bool or a CEL error (its message, as a str).
            if not isinstance(value, bool):
                value = f"evaluation failed: {value}"
            results.append(value)
        out.append(results)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
