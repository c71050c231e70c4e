"""The sandbox: generated code runs only in separate processes inside operating-system isolation.

Used by synthesis (`megapmp.synth.verified`: test-verified pairs) and by evaluation
(`megapmp.eval.code_bon`: best-of-n by execution). Two standard-library-only files, so that they can be
copied and run on their own, as the escape tests do: `megapmp.sandbox.runner` (the caller's side: backends,
launching, verdicts; its docstring states what the sandbox promises) and `megapmp.sandbox.inside` (the
trusted code that sets each sandboxed process up and, for test runs, the judge and the plain-data channel).
"""

from megapmp.sandbox.runner import (GUARANTEES, PROGRAM_NAME, DoctestRun, SandboxResult, SandboxUnavailable, Status,
                                    doctest_plan, humaneval_program, require_sandbox, run_doctests, run_tests,
                                    run_untrusted, sandbox_capabilities)

__all__ = ["GUARANTEES", "PROGRAM_NAME", "DoctestRun", "SandboxResult", "SandboxUnavailable", "Status", "doctest_plan",
           "humaneval_program", "require_sandbox", "run_doctests", "run_tests", "run_untrusted", "sandbox_capabilities"]
