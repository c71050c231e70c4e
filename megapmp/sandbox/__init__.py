"""The sandbox: generated code runs only in a separate process inside operating-system isolation.

Used by synthesis (`megapmp.synth.verified`: test-verified pairs) and by evaluation
(`megapmp.eval.code_bon`: best-of-n by execution). The implementation is one standard-library-only module,
`megapmp.sandbox.runner` (its docstring describes the isolation layers), so that it can be copied and run
on its own, as the escape tests do.
"""

from megapmp.sandbox.runner import (PROGRAM_NAME, SandboxResult, SandboxUnavailable, Status, humaneval_program,
                                    require_sandbox, run_reporting, run_tests, run_untrusted,
                                    sandbox_capabilities)

__all__ = ["PROGRAM_NAME", "SandboxResult", "SandboxUnavailable", "Status", "humaneval_program", "require_sandbox",
           "run_reporting", "run_tests", "run_untrusted", "sandbox_capabilities"]
