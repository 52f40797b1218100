// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.bundle

import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.security.MessageDigest

/** A JSON file of a bundle (manifest.json, reference.json), read one dotted path at a time.
 *
 * Every field the app reads goes through [path] with a literal dotted path, so a test of this
 * project (tests/test_demo_apps.py) can check each one exists in a real bundle's files. */
class BundleJson(val text: String) {
    private val root = JSONObject(text)

    /** The value at `a.b.c`, or null when any step is missing. */
    fun path(dotted: String): Any? {
        var node: Any? = root
        for (key in dotted.split(".")) {
            node = (node as? JSONObject)?.opt(key) ?: return null
            if (node == JSONObject.NULL) return null
        }
        return node
    }

    fun string(dotted: String): String? = path(dotted) as? String
    fun int(dotted: String): Int? = (path(dotted) as? Number)?.toInt()
    fun double(dotted: String): Double? = (path(dotted) as? Number)?.toDouble()
    fun ints(dotted: String): List<Int> = (path(dotted) as? JSONArray)?.let { a -> List(a.length()) { a.getInt(it) } } ?: emptyList()
}

/** A bundle folder as `mobile-export build` writes it: every decision the app makes is read here. */
class BundleFiles(val folder: File) {
    val manifestText: String = File(folder, "manifest.json").readText()
    val manifest = BundleJson(manifestText)

    val backend: String = manifest.string("backend") ?: error("manifest.json has no backend")
    val format: String = manifest.string("artifact.format") ?: error("manifest.json has no artifact.format")
    val contextLength: Int = manifest.int("context_length") ?: error("manifest.json has no context_length")
    val scheme: String = manifest.string("quantization.scheme") ?: "unknown"
    val eosIds: List<Int> = manifest.ints("tokenizer.eos_ids")
    val bosId: Int? = manifest.int("tokenizer.bos_id")
    val addBos: Boolean = manifest.path("tokenizer.add_bos") as? Boolean ?: true
    val chatTemplate: String? = manifest.string("tokenizer.chat_template")
    val endOfTurnIds: List<Int> = manifest.ints("tokenizer.end_of_turn_ids")

    /** The artifact (model.pte, or model.onnx whose folder ONNX Runtime GenAI opens), never outside the bundle. */
    val artifact: File = inside(manifest.string("artifact.file") ?: error("manifest.json has no artifact.file"))

    /** The bundle's tokenizer.json (ExecuTorch's LlmModule reads it; ONNX GenAI finds it in the folder). */
    val tokenizer: File = inside("tokenizer.json")

    val reference: BundleJson? = File(folder, "reference.json").takeIf { it.isFile }?.let { BundleJson(it.readText()) }

    /** sha256 of manifest.json's bytes: which bundle a results file measured. */
    val manifestSha256: String =
        MessageDigest.getInstance("SHA-256").digest(manifestText.toByteArray()).joinToString("") { "%02x".format(it) }

    private fun inside(name: String): File {
        require(name.isNotEmpty() && !name.contains('/') && !name.contains("..")) { "bundle file '$name' is not a plain name in the bundle" }
        return File(folder, name)
    }
}
