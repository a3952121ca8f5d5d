// Latency of SavedModel signatures in TensorFlow's C++ runtime, the way TensorFlow Serving runs them.
//
// TensorFlow Serving loads a SavedModel with tensorflow::LoadSavedModel and answers a Predict
// request with one Session::Run of the signature's feeds and fetches. This program does the same,
// in one process, for one query string per call, and prints the milliseconds of each call as JSON.
// It leaves out what a server adds around the call (protocol buffers, gRPC, batching), so the
// figures are the model's own cost without an interpreter in front of it.
//
// benchmarks/retrieval.py builds and runs it (g++ with tf.sysconfig's flags, linked against the
// libtensorflow_cc.so.2 and libtensorflow_framework.so.2 of the installed TensorFlow wheel).
//
// Usage:
//   serve_latency QUERIES_FILE WARMUP BLOCK [--load-library OPS.so]... [--context NAME=VALUE]...
//                 [--strings NAME=V1,V2,...]... [--int32 NAME=V]... [--record N]
//                 LABEL=SAVED_MODEL_DIR:SIGNATURE ...
//
// QUERIES_FILE holds one query string per line. Each signature takes the string as its `query`
// input (shape [1]); its other inputs get a fixed value, the same in every call:
//   --context NAME=VALUE      a [1] string (query context such as `query_country`);
//   --strings NAME=V1,V2,...  a [1, M] string, the values split at commas (M = 0 for `NAME=`),
//                             e.g. the allow-lists of a `*_filtered` signature (`categories`);
//   --int32 NAME=V            a [1] int32 (e.g. `max_per_category`).
// A signature takes the values its inputs name and ignores the others, so one run can time a
// signature with filter inputs beside one without. The calls take turns in blocks of
// BLOCK queries, the order of the signatures rotating from block to block (as
// benchmarks/retrieval.py does in Python), after WARMUP queries sent to every signature.
//
// `--load-library` loads a custom-op library with TF_LoadLibrary before the SavedModels that need
// it, as a TensorFlow Serving build with the ops linked in would: ScaNN's _scann_ops.so for the
// `_scann` model, tensorflow-text's _normalize_ops.so (NormalizeUTF8) and _wordpiece_tokenizer.so
// (WordpieceTokenizeWithOffsets) for a model with a pretrained text encoder
// (`model.text_encoder: minilm`, whose WordPiece tokenizer is in the graph). A SavedModel that
// uses an op no loaded library registers fails (at LoadSavedModel, or at the first Session::Run
// when the op is inside a function) with TensorFlow's "Op type not registered" and a hint to pass
// the library.
//
// Output (stdout, one line):
//   {"times_ms": {LABEL: [ms, ...]},
//    "first_product_ids": {LABEL: [...]},
//    "outputs": {LABEL: [{OUTPUT: {"shape": [...], "values": [...]}, ...}, ...]},
//    "loaded_ops": {LIBRARY: [op, ...]}}
// first_product_ids holds the `product_ids` output for the first query (signatures that have
// one); outputs holds every output of the first N queries (`--record N`, default 1; values
// flattened row-major; float, integer and string outputs), to check that the C++ runtime gives
// the same results as Python; loaded_ops names the ops each `--load-library` registered.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "tensorflow/c/c_api.h"
#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/op_def.pb.h"
#include "tensorflow/core/public/session.h"

namespace {

struct Signature {
  std::string label;
  tensorflow::SavedModelBundle* bundle;
  std::string input;                  // the `query` input's tensor name
  std::vector<std::pair<std::string, tensorflow::Tensor>> fixed;  // the context inputs: tensor name, value
  std::vector<std::string> fetches;   // every output's tensor name
  std::vector<std::string> outputs;   // every output's key, in the order of fetches
  int product_ids = -1;               // index in fetches of the `product_ids` output, or -1
};

tensorflow::Tensor OneString(const std::string& value) {
  tensorflow::Tensor t(tensorflow::DT_STRING, tensorflow::TensorShape({1}));
  t.flat<tensorflow::tstring>()(0) = value;
  return t;
}

// A [1, M] string tensor of `values`.
tensorflow::Tensor StringRow(const std::vector<std::string>& values) {
  tensorflow::Tensor t(tensorflow::DT_STRING, tensorflow::TensorShape({1, static_cast<int64_t>(values.size())}));
  for (size_t i = 0; i < values.size(); ++i) t.flat<tensorflow::tstring>()(i) = values[i];
  return t;
}

tensorflow::Tensor OneInt32(int32_t value) {
  tensorflow::Tensor t(tensorflow::DT_INT32, tensorflow::TensorShape({1}));
  t.flat<int32_t>()(0) = value;
  return t;
}

[[noreturn]] void Fail(const std::string& message) {
  std::cerr << "serve_latency: " << message << "\n";
  std::exit(1);
}

std::string JsonString(const std::string& s) {
  std::ostringstream out;
  out << '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out << buf;
    } else {
      out << c;
    }
  }
  out << '"';
  return out.str();
}

// A tensor as {"shape": [...], "values": [...]} (row-major), or "null" for a dtype not written here.
std::string JsonTensor(const tensorflow::Tensor& t) {
  std::ostringstream out;
  out << std::setprecision(9) << "{\"shape\": [";
  for (int d = 0; d < t.dims(); ++d) out << (d ? ", " : "") << t.dim_size(d);
  out << "], \"values\": [";
  const int64_t n = t.NumElements();
  for (int64_t i = 0; i < n; ++i) {
    if (i) out << ", ";
    switch (t.dtype()) {
      case tensorflow::DT_FLOAT: {
        const float v = t.flat<float>()(i);  // NaN and infinities as Python's json reads them
        if (std::isnan(v)) out << "NaN"; else if (std::isinf(v)) out << (v > 0 ? "Infinity" : "-Infinity"); else out << v;
        break;
      }
      case tensorflow::DT_INT32: out << t.flat<int32_t>()(i); break;
      case tensorflow::DT_INT64: out << t.flat<int64_t>()(i); break;
      case tensorflow::DT_STRING: out << JsonString(std::string(t.flat<tensorflow::tstring>()(i))); break;
      default: return "null";
    }
  }
  out << "]}";
  return out.str();
}

// `message`, with a hint when it is TensorFlow's "Op type not registered": LoadSavedModel reports it for
// an op of the graph, the first Session::Run for an op inside a function (e.g. a signature's).
std::string WithOpHint(std::string message) {
  if (message.find("Op type not registered") != std::string::npos) {
    message += "\n(a custom op: pass the library that registers it with --load-library, e.g. ScaNN's "
               "_scann_ops.so for Scann* ops, tensorflow-text's _normalize_ops.so and _wordpiece_tokenizer.so "
               "for NormalizeUTF8 and WordpieceTokenizeWithOffsets)";
  }
  return message;
}

std::vector<tensorflow::Tensor> Run(const Signature& s, const std::string& text) {
  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds = s.fixed;
  feeds.emplace_back(s.input, OneString(text));
  std::vector<tensorflow::Tensor> outputs;
  auto status = s.bundle->session->Run(feeds, s.fetches, {}, &outputs);
  if (!status.ok()) Fail(WithOpHint(s.label + ": " + status.ToString()));
  return outputs;
}

// NAME=VALUE split at the first '=' (`flag` names the option in the error).
std::pair<std::string, std::string> NameValue(const std::string& flag, const std::string& pair) {
  const auto at = pair.find('=');
  if (at == std::string::npos || at == 0) Fail(flag + " " + pair + ": not NAME=VALUE");
  return {pair.substr(0, at), pair.substr(at + 1)};
}

// "a,b,c" as {"a", "b", "c"}; "" as {} (no value: a [1, 0] tensor).
std::vector<std::string> SplitCommas(const std::string& text) {
  std::vector<std::string> out;
  if (text.empty()) return out;
  size_t start = 0;
  for (size_t comma; (comma = text.find(',', start)) != std::string::npos; start = comma + 1) {
    out.push_back(text.substr(start, comma - start));
  }
  out.push_back(text.substr(start));
  return out;
}

// How to give a missing input of `dtype` (and `rank`, -1 when unknown) on the command line.
std::string FlagHint(const std::string& key, tensorflow::DataType dtype, int rank) {
  if (dtype == tensorflow::DT_INT32) return "--int32 " + key + "=VALUE";
  if (dtype == tensorflow::DT_STRING && rank == 2) return "--strings " + key + "=V1,V2,...";
  return "--context " + key + "=VALUE";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    Fail("usage: serve_latency QUERIES_FILE WARMUP BLOCK [--load-library OPS.so]... [--context NAME=VALUE]... "
         "[--strings NAME=V1,V2,...]... [--int32 NAME=V]... [--record N] LABEL=DIR:SIGNATURE ...");
  }
  std::ifstream file(argv[1]);
  if (!file) Fail(std::string("cannot read ") + argv[1]);
  std::vector<std::string> texts;
  for (std::string line; std::getline(file, line);) texts.push_back(line);
  if (texts.empty()) Fail(std::string(argv[1]) + " holds no query");
  const int warmup = std::atoi(argv[2]);
  const size_t block = std::max(1, std::atoi(argv[3]));

  std::vector<std::unique_ptr<tensorflow::SavedModelBundle>> bundles;
  std::map<std::string, tensorflow::SavedModelBundle*> loaded;  // one bundle per directory
  std::vector<Signature> signatures;
  std::map<std::string, std::string> context;
  std::map<std::string, std::vector<std::string>> strings;  // --strings: [1, M] string inputs
  std::map<std::string, int32_t> int32s;                    // --int32: [1] int32 inputs
  std::vector<std::pair<std::string, std::vector<std::string>>> loaded_ops;  // library, the ops it registered
  size_t record = 1;
  for (int a = 4; a < argc; ++a) {
    const std::string arg = argv[a];
    if (arg == "--load-library") {
      if (++a == argc) Fail("--load-library needs a path");
      TF_Status* status = TF_NewStatus();
      TF_Library* library = TF_LoadLibrary(argv[a], status);
      if (TF_GetCode(status) != TF_OK) Fail(std::string("--load-library ") + argv[a] + ": " + TF_Message(status));
      TF_DeleteStatus(status);
      tensorflow::OpList ops;  // the library stays loaded: TF_DeleteLibraryHandle would only free this list
      const TF_Buffer list = TF_GetOpList(library);
      ops.ParseFromArray(list.data, static_cast<int>(list.length));
      loaded_ops.emplace_back(argv[a], std::vector<std::string>());
      for (const auto& op : ops.op()) loaded_ops.back().second.push_back(op.name());
      continue;
    }
    if (arg == "--record") {
      if (++a == argc) Fail("--record needs a number of queries");
      record = static_cast<size_t>(std::max(0, std::atoi(argv[a])));
      continue;
    }
    if (arg == "--context") {
      if (++a == argc) Fail("--context needs NAME=VALUE");
      const std::string pair = argv[a];
      const auto at = pair.find('=');
      if (at == std::string::npos) Fail("--context " + pair + ": not NAME=VALUE");
      context[pair.substr(0, at)] = pair.substr(at + 1);
      continue;
    }
    if (arg == "--strings") {
      if (++a == argc) Fail("--strings needs NAME=V1,V2,...");
      const auto [key, values] = NameValue(arg, argv[a]);
      strings[key] = SplitCommas(values);
      continue;
    }
    if (arg == "--int32") {
      if (++a == argc) Fail("--int32 needs NAME=VALUE");
      const auto [key, value] = NameValue(arg, argv[a]);
      char* end = nullptr;
      const long parsed = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || parsed < INT32_MIN || parsed > INT32_MAX) {
        Fail("--int32 " + key + "=" + value + ": not a 32-bit integer");
      }
      int32s[key] = static_cast<int32_t>(parsed);
      continue;
    }
    const auto eq = arg.find('='), colon = arg.rfind(':');
    if (eq == std::string::npos || colon == std::string::npos || colon < eq) Fail("not LABEL=DIR:SIGNATURE: " + arg);
    const std::string label = arg.substr(0, eq), dir = arg.substr(eq + 1, colon - eq - 1), name = arg.substr(colon + 1);
    if (!loaded.count(dir)) {
      auto bundle = std::make_unique<tensorflow::SavedModelBundle>();
      auto status = tensorflow::LoadSavedModel(tensorflow::SessionOptions(), tensorflow::RunOptions(), dir,
                                               {"serve"}, bundle.get());
      if (!status.ok()) Fail(WithOpHint(dir + ": " + status.ToString()));
      loaded[dir] = bundle.get();
      bundles.push_back(std::move(bundle));
    }
    const auto& defs = loaded[dir]->meta_graph_def.signature_def();
    const auto def = defs.find(name);
    if (def == defs.end()) Fail(dir + " has no signature " + name);
    const auto input = def->second.inputs().find("query");
    if (input == def->second.inputs().end()) Fail(dir + ":" + name + " has no input `query`");
    Signature s{label, loaded[dir], input->second.name(), {}, {}, {}};
    for (const auto& [key, info] : def->second.inputs()) {
      if (key == "query") continue;
      if (const auto row = strings.find(key); row != strings.end()) {
        s.fixed.emplace_back(info.name(), StringRow(row->second));
      } else if (const auto number = int32s.find(key); number != int32s.end()) {
        s.fixed.emplace_back(info.name(), OneInt32(number->second));
      } else if (const auto value = context.find(key); value != context.end()) {
        s.fixed.emplace_back(info.name(), OneString(value->second));
      } else {
        const int rank = info.tensor_shape().unknown_rank() ? -1 : info.tensor_shape().dim_size();
        Fail(dir + ":" + name + " needs the input `" + key + "`: pass " + FlagHint(key, info.dtype(), rank));
      }
    }
    for (const auto& [key, info] : def->second.outputs()) {
      if (key == "product_ids") s.product_ids = static_cast<int>(s.fetches.size());
      s.fetches.push_back(info.name());
      s.outputs.push_back(key);
    }
    signatures.push_back(s);
  }
  if (signatures.empty()) Fail("no signature to time");

  for (int i = 0; i < warmup; ++i) {
    for (const auto& s : signatures) Run(s, texts[i % texts.size()]);
  }
  std::vector<std::vector<double>> ms(signatures.size());
  for (size_t b = 0, first = 0; first < texts.size(); ++b, first += block) {
    for (size_t j = 0; j < signatures.size(); ++j) {
      const size_t n = (j + b) % signatures.size();
      for (size_t i = first; i < std::min(texts.size(), first + block); ++i) {
        const auto start = std::chrono::steady_clock::now();
        Run(signatures[n], texts[i]);
        ms[n].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
    }
  }

  std::cout << "{\"times_ms\": {";
  for (size_t n = 0; n < signatures.size(); ++n) {
    std::cout << (n ? ", " : "") << JsonString(signatures[n].label) << ": [";
    for (size_t i = 0; i < ms[n].size(); ++i) std::cout << (i ? ", " : "") << ms[n][i];
    std::cout << "]";
  }
  // The outputs of the first `record` queries (after the timing: the timed calls run as before).
  std::vector<std::vector<std::vector<tensorflow::Tensor>>> recorded(signatures.size());
  for (size_t n = 0; n < signatures.size(); ++n) {
    for (size_t i = 0; i < std::min(std::max<size_t>(record, 1), texts.size()); ++i) {
      recorded[n].push_back(Run(signatures[n], texts[i]));
    }
  }
  std::cout << "}, \"first_product_ids\": {";
  bool any = false;
  for (size_t n = 0; n < signatures.size(); ++n) {
    const auto& s = signatures[n];
    if (s.product_ids < 0) continue;
    const auto ids = recorded[n][0][s.product_ids].flat<tensorflow::tstring>();
    std::cout << (any ? ", " : "") << JsonString(s.label) << ": [";
    for (int i = 0; i < ids.size(); ++i) std::cout << (i ? ", " : "") << JsonString(std::string(ids(i)));
    std::cout << "]";
    any = true;
  }
  std::cout << "}, \"outputs\": {";
  for (size_t n = 0; n < signatures.size(); ++n) {
    std::cout << (n ? ", " : "") << JsonString(signatures[n].label) << ": [";
    for (size_t i = 0; i < std::min(record, recorded[n].size()); ++i) {
      std::cout << (i ? ", " : "") << "{";
      for (size_t o = 0; o < signatures[n].outputs.size(); ++o) {
        std::cout << (o ? ", " : "") << JsonString(signatures[n].outputs[o]) << ": " << JsonTensor(recorded[n][i][o]);
      }
      std::cout << "}";
    }
    std::cout << "]";
  }
  std::cout << "}, \"loaded_ops\": {";
  for (size_t l = 0; l < loaded_ops.size(); ++l) {
    std::cout << (l ? ", " : "") << JsonString(loaded_ops[l].first) << ": [";
    for (size_t i = 0; i < loaded_ops[l].second.size(); ++i) std::cout << (i ? ", " : "") << JsonString(loaded_ops[l].second[i]);
    std::cout << "]";
  }
  std::cout << "}}\n";
  return 0;
}
