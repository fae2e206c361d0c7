# ctest of the bench program (fsa_bench) on the CPU backend (a few seconds): the workload mode's
# every pass, a block selection, a key mask, fp32, --json (each line parsed) and flag errors (exit
# status 2, the flag named); the --tiles mode; the usage without a mode; --check / --bench refused
# by a build without CUDA (WITH_CUDA=OFF).
#
#   cmake -DCLI=build/fsa_bench [-DWITH_CUDA=ON] -P bench/cli_test.cmake

cmake_minimum_required(VERSION 3.24)
if(NOT CLI)
  message(FATAL_ERROR "pass -DCLI=<path to fsa_bench>")
endif()

# run_cli(<expected exit status> <regex the output must match> <args...>); sets `cli_out`.
function(run_cli expected pattern)
  execute_process(COMMAND ${CLI} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL expected)
    message(FATAL_ERROR "${CLI} ${ARGN}\nexit status ${rc}, expected ${expected}\n${out}${err}")
  endif()
  if(NOT "${out}${err}" MATCHES "${pattern}")
    message(FATAL_ERROR "${CLI} ${ARGN}\noutput does not match '${pattern}':\n${out}${err}")
  endif()
  if(expected EQUAL 0 AND NOT err STREQUAL "")
    message(FATAL_ERROR "${CLI} ${ARGN}\nunexpected stderr:\n${err}")
  endif()
  set(cli_out "${out}" PARENT_SCOPE)
endfunction()

set(cpu --device cpu --warmup 1)

# The table: plan row and one row per mode, with timings.
run_cli(0 "plan +[0-9.]+.*\nfwd +[0-9.]+.*\nbwd +[0-9.]+.*\nfwd\\+bwd +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +50\\.20%"
        ${cpu} --shape 1,256,256,2,1,64 --causal --reps 3 --mode fwd,bwd,fwdbwd)

# Trainable mask (Sq != Sk, GQA): JSON lines, each a parseable object with the fields a sweep reads.
run_cli(0 "\"kind\": \"bwd\"" ${cpu} --shape 1,384,512,4,2,64 --causal --density 0.3 --mode fwd,bwd
        --reps 2 --json)
string(REPLACE ";" "," lines "${cli_out}")  # a CMake list is ';'-separated
string(REPLACE "\n" ";" lines "${lines}")
list(FILTER lines EXCLUDE REGEX "^$")
list(LENGTH lines n)
if(NOT n EQUAL 3)
  message(FATAL_ERROR "--json: expected 3 lines (plan, fwd, bwd), got ${n}:\n${cli_out}")
endif()
foreach(line IN LISTS lines)
  foreach(field kind ms ms_min ms_p90 density dense_density top_k tflops dense_tflops cache method)
    string(JSON value ERROR_VARIABLE json_error GET "${line}" ${field})
    if(json_error)
      message(FATAL_ERROR "--json: field ${field}: ${json_error}\n${line}")
    endif()
  endforeach()
endforeach()
list(GET lines 0 first)
string(JSON top_k GET "${first}" top_k)
string(JSON density GET "${first}" density)
# Diagonal blocks only: 0.126 of the entries; top-1 adds one whole block per query block: 0.376.
if(NOT top_k EQUAL 1 OR NOT density MATCHES "^0\\.37")
  message(FATAL_ERROR "--density 0.3 at (384, 512): expected top-1 and density 0.376, got "
                      "top-${top_k} and ${density}")
endif()

# Decode with a key-only mask: GB/s over kept K+V, density exactly 1/4.
run_cli(0 "\"density\": 0\\.25,.*\"gbps\": [0-9]" ${cpu} --shape 2,1,4096,8,2,64 --causal
        --key-mask-every 4 --reps 2 --json --l2 warm)

# fp32, non-causal top-k selection on 64-key blocks, forward + backward.
run_cli(0 "fwd\\+bwd +[0-9.]+" ${cpu} --dtype fp32 --shape 1,200,300,2,2,40 --top-k 1
        --select-block 64 --mode fwdbwd --reps 2)

# Errors name the flag and the expected value.
run_cli(2 "--shape: expected six comma-separated integers" ${cpu} --shape 1,2,3)
run_cli(2 "--shape: H \\(3\\) must be a multiple of Hk \\(2\\)" ${cpu} --shape 1,256,256,3,2,64)
run_cli(2 "--reps: expected an integer >= 1, got '0'" ${cpu} --shape 1,64,64,1,1,64 --reps 0)
run_cli(2 "--mode: expected fwd, bwd or fwdbwd" ${cpu} --shape 1,64,64,1,1,64 --mode fwd,both)
run_cli(2 "--density: expected a fraction" ${cpu} --shape 1,64,64,1,1,64 --density 30)
run_cli(2 "--select-block: .*multiples of the plan's tiles" ${cpu} --shape 1,256,256,1,1,64
        --top-k 1 --select-block 96)
run_cli(2 "unknown argument '--bogus'" ${cpu} --bogus)

# The CPU skipping benchmark: both cases, the speedup line; a bad flag is named.
run_cli(0 "no mask, causal .*\ntile mask \\+ causal .*speedup over no mask: forward [0-9.]+x"
        --tiles --seqlen 256 --heads 2 --kv-heads 1 --dim 64 --reps 1 --threads 1)
run_cli(2 "--tiles: unknown argument '--shape'" --tiles --shape 1,64,64,1,1,64)
run_cli(2 "not with --check" --tiles --check)
# Without a mode: the usage, every mode named.
run_cli(2 "fsa_bench --shape.*fsa_bench --tiles.*fsa_bench --check.*fsa_bench --bench")
if(NOT WITH_CUDA)
  run_cli(2 "--check and --bench need the CUDA backend" --check)
endif()
