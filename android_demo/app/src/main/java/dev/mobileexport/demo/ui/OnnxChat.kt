// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.ui

import ai.onnxruntime.genai.SimpleGenAI
import dev.mobileexport.demo.bundle.BundleFiles

/** One chat turn on an ONNX bundle with ONNX Runtime GenAI's SimpleGenAI (its tokenizer reads the
 * bundle folder's tokenizer files and genai_config.json's eos ids). */
object OnnxChat {
    fun reply(bundle: BundleFiles, prompt: String): String {
        val genai = SimpleGenAI(bundle.folder.absolutePath)
        val params = genai.createGeneratorParams().apply { setSearchOption("max_length", bundle.contextLength.toDouble()) }
        val text = StringBuilder()
        genai.generate(params, prompt) { piece -> text.append(piece) }
        return text.toString()
    }
}
