"""scripts/sass_loops.py, the SASS loop counter used to compare the CUDA kernels' hot loops without a GPU:
its parsing of cuobjdump's output on a fixed excerpt (no CUDA toolkit needed)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sass_loops", os.path.join(ROOT, "scripts", "sass_loops.py"))
sass_loops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_loops)

# Two functions in cuobjdump -sass layout: the first with an outer loop around an inner one, a forward
# branch and a predicated backward branch; the second with none.
SASS = """
	code for sm_90
		Function : _Z6kernelPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                    /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;               /* 0x0000000402027981 */
        /*0020*/                   LDG.E.128.CONSTANT R4, desc[UR4][R6.64] ; /* 0x0000000406047981 */
        /*0030*/                   FMNMX.NAN R8, R4, R5, !PT ;               /* 0x0000000504087209 */
        /*0040*/                   MUFU.EX2 R9, R8 ;                         /* 0x0000000800097308 */
        /*0050*/               @P0 BRA 0x20 ;                                /* 0xfffffffc00000947 */
        /*0060*/              @!P1 BRA 0x90 ;                                /* 0x0000000000208947 */
        /*0070*/                   FADD R1, R1, R9 ;                         /* 0x0000000901017221 */
        /*0080*/                   BRA 0x10 ;                                /* 0xfffffff800007947 */
        /*0090*/                   EXIT ;                                    /* 0x000000000000794d */
		..........
		Function : _Z5otherv
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   EXIT ;                                    /* 0x000000000000794d */
"""


def test_functions_and_their_instructions():
    funcs = list(sass_loops.kernels(SASS))
    assert [name for name, _ in funcs] == ["_Z6kernelPf", "_Z5otherv"]
    ins = funcs[0][1]
    assert len(ins) == 10 and ins[0] == (0x0, "MOV R1, c[0x0][0x28]") and ins[-1] == (0x90, "EXIT")
    assert funcs[1][1] == [(0x0, "EXIT")]


def test_loops_are_backward_branches_with_what_they_jump_over():
    ins = dict(sass_loops.kernels(SASS))["_Z6kernelPf"]
    found = [(start, end, len(body)) for start, end, body in sass_loops.loops(ins)]
    # the predicated branch at 0x50 back to 0x20 (4 instructions), the unconditional one at 0x80 back to 0x10
    # (8); the forward branch at 0x60 is no loop
    assert found == [(0x20, 0x50, 4), (0x10, 0x80, 8)]
    assert list(sass_loops.loops(dict(sass_loops.kernels(SASS))["_Z5otherv"])) == []


def test_opcode_skips_the_predicate():
    assert sass_loops.opcode("@!P0 FADD R1, R1, R9") == "FADD"
    assert sass_loops.opcode("LDG.E.128.CONSTANT R4, desc[UR4][R6.64]") == "LDG.E.128.CONSTANT"
