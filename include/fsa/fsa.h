#pragma once
// Umbrella header of the flash sparse attention C++ API.
#include "fsa/attention.h"
#include "fsa/error.h"
#include "fsa/plan.h"
#include "fsa/tensor.h"
