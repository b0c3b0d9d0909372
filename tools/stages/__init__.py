"""The built-in stage types of tools.pipeline, registered in `tools.pipeline.stage.STAGES` on
import (`load_pipeline` imports this package):

* `basic`: `prompt` (your own template, n samples) and `filter` (conditions on a field);
* `reasoning`: `difficulty` (Phi-4's question-difficulty filter), `self_revise`
  (critique -> revise), `rewrite` (a passage -> an exercise, discussion or reasoning task),
  `qa_extract` (question/answer pairs from a passage);
* `code`: `verify_code` (run code + tests in the sandbox, teacher repairs) and
  `reverse_instruction` (code -> instruction -> regenerated code, kept when faithful);
* `filters`: `decontaminate`, `quality_label`, `topic_label`, `quality_filter`, `chunk`;
* `templated`: the shared base of the stages that ask the teacher with template files.

Every stage counts what it did in `stage.stats` (a Counter: kept, dropped_all_agree,
accepted, verified, repaired, dropped_failing, ...) for the records this process handled; the
records themselves are the durable output.
"""
from tools.stages.basic import FilterStage, PromptStage
from tools.stages.code import (ReverseInstructionStage, VerifyCodeStage, code_similarity,
                               normalise_code)
from tools.stages.filters import (ChunkStage, DecontaminateStage, QualityFilterStage,
                                  QualityLabelStage, TopicLabelStage)
from tools.stages.reasoning import (REWRITE_KINDS, Decision, DifficultyStage, QAExtractStage,
                                    RewriteStage, SelfReviseStage, difficulty_filter,
                                    parse_problem_solution, parse_qa_pairs, parse_verdict)
from tools.stages.templated import TEMPLATES, TemplatedStage
